"""kdcore's built-in strategies.

They are ordinary plugins: each module below implements the public hooks from
:mod:`kdcore.hookspecs` and is listed in the ``kdcore`` entry-point group of kdcore's own
``pyproject.toml``, exactly as a third-party package would do. Nothing here imports torch at
module level, so ``kd list-plugins`` stays fast.
"""
