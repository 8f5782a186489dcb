"""``kd new-plugin``: write a complete, installable plugin package for one strategy, from the templates
in ``templates/`` (package data).

The package it writes (``kd-plugin-NAME/``) is ready to ``pip install -e``: a ``pyproject.toml``
whose ``kdcore`` entry point names the module, the module itself (``kd_plugin_NAME/__init__.py``,
whose docstring is the author's quick guide) with a working strategy of the chosen kind, a
pydantic ``Params`` model and the registration hook, a test file that passes as generated, and a
README. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from kdcore.errors import KdError
from kdcore.files import atomic_directory, check_output_dir
from kdcore.strategies import KINDS

__all__ = ["KIND_CHOICES", "PluginNames", "plugin_names", "write_plugin"]


_VALID = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_MAX_LENGTH = 30
#: Names the generated module imports: a class must not shadow them.
_TAKEN = {
    "BaseModel",
    "ConfigDict",
    "DifficultyScorer",
    "Divergence",
    "Field",
    "KdError",
    "Literal",
    "PacingFunction",
    "ReliancePolicy",
    "ScorerContext",
}


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the strategy name ``name`` (e.g. ``loss-trend``)."""

    name: str  # the strategy's registry name: kd run --scorer loss-trend
    kind: str
    dist: str  # kd-plugin-loss-trend
    module: str  # kd_plugin_loss_trend
    cls: str  # LossTrend
    test_module: str  # test_loss_trend


def plugin_names(name: str, kind: str) -> PluginNames:
    """Validate ``name`` and ``kind`` and derive the package, module and class names."""
    if kind not in KIND_CHOICES:
        raise KdError(f"unknown plugin kind '{kind}'; choose one of {', '.join(KIND_CHOICES)}")
    if name.startswith("kd-plugin-"):
        raise KdError(
            f"give the strategy name without the 'kd-plugin-' prefix (e.g. '{name[len('kd-plugin-') :]}'); "
            "the package is named kd-plugin-NAME for you"
        )
    if not _VALID.match(name) or len(name) > _MAX_LENGTH:
        raise KdError(
            f"plugin name '{name}' is not valid: use lower-case letters, digits and single dashes, "
            f"starting with a letter and at most {_MAX_LENGTH} characters (e.g. 'loss-trend')"
        )
    snake = name.replace("-", "_")
    cls = "".join(part[:1].upper() + part[1:] for part in name.split("-"))
    if cls in _TAKEN:
        cls += "Strategy"
    return PluginNames(name, kind, f"kd-plugin-{name}", f"kd_plugin_{snake}", cls, f"test_{snake}")


def _check_not_registered(names: PluginNames) -> None:
    """Refuse a name the installed plugins already use for that kind (it would be a duplicate)."""
    from kdcore.plugins import get_registry

    taken = [e for e in get_registry().entries if e.kind == names.kind and e.name == names.name]
    if taken:
        raise KdError(
            f"{names.kind} '{names.name}' is already provided by {taken[0].distribution}; "
            "choose another name (kdcore refuses a strategy name registered twice)"
        )


def write_plugin(name: str, kind: str = "scorer", output_dir: Path | str = ".") -> Path:
    """Write ``<output_dir>/kd-plugin-NAME/`` and return its path.

    Raises :class:`KdError` for an invalid name or kind, a name already taken by an installed
    plugin of that kind, or an existing target directory (nothing is ever overwritten).
    """
    names = plugin_names(name, kind)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, "--output-dir")
    target = output_dir / names.dist
    if target.exists() or target.is_symlink():
        raise KdError(f"'{target}' already exists; remove it or choose another --output-dir")
    _check_not_registered(names)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Written into a temporary sibling and renamed: no half-written package on failure.
    with atomic_directory(target) as staging:
        for relative, text in render(names).items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return target


def render(names: PluginNames) -> dict[str, str]:
    """The generated files, relative path -> text, from the templates in ``kdcore/scaffold/templates``."""
    from kdcore import __version__

    kind = KINDS[names.kind]
    values = {
        "name": names.name,
        "kind": names.kind,
        "dist": names.dist,
        "module": names.module,
        "cls": names.cls,
        "test_module": names.test_module,
        "base": kind.base.__name__,
        "hook": kind.hook,
        "what": kind.what,
        "summary": _template(f"{names.kind}.summary.txt").rstrip("\n"),
        "kdcore_version": __version__,
    }

    def fill(name: str) -> str:
        return Template(_template(name)).substitute(values)

    test_imports = fill(f"{names.kind}.test_imports.py.tmpl")
    values.update(
        strategy=fill(f"{names.kind}.strategy.py.tmpl").rstrip("\n"),
        tests=fill(f"{names.kind}.tests.py.tmpl").rstrip("\n"),
        readme_params=_template(f"{names.kind}.parameters.md").strip("\n"),
        imports=fill(f"{names.kind}.imports.py.tmpl").strip("\n"),
        test_imports=test_imports.strip("\n"),
        test_setup="torch.set_num_threads(1)\n" if "import torch" in test_imports else "",
    )
    return {
        "pyproject.toml": fill("pyproject.toml.tmpl"),
        "README.md": fill("README.md.tmpl"),
        ".gitignore": _template("gitignore.tmpl"),
        f"{names.module}/__init__.py": fill("module.py.tmpl"),
        f"tests/{names.test_module}.py": fill("test_module.py.tmpl"),
    }


def _template(name: str) -> str:
    """A template file (``string.Template``: ``$name`` placeholders, ``$$`` for a literal dollar)."""
    return TEMPLATES.joinpath(name).read_text(encoding="utf-8")


#: The templates: the package's files, and per kind ``KIND.*``: its strategy, tests and parameters.
TEMPLATES = resources.files(__name__) / "templates"
#: The kinds ``kd new-plugin`` has a template for.
KIND_CHOICES = tuple(kind for kind in KINDS if TEMPLATES.joinpath(f"{kind}.strategy.py.tmpl").is_file())
