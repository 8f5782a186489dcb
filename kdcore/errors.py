"""User-facing errors: one sentence that names the problem and the fix.

The CLI prints a :class:`KdError` without a traceback and exits non-zero; anything else is a bug.
"""


class KdError(Exception):
    """A problem the user can fix (bad input, missing plugin, mismatched models...)."""


class PluginError(KdError):
    """A strategy name that is unknown, duplicated, or provided by a broken plugin."""
