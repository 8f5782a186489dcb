"""The public API: exactly what docs/plugins.md promises, importable without torch, and enough.

"Enough" is checked by use: the built-in strategies and the example plugin distributions import
only names from ``kdcore.__all__`` (and no kdcore submodule), as do the packages `kd new-plugin`
writes.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO

import kdcore

DOC = REPO / "docs" / "plugins.md"
SECTION = re.compile(r"^## The public API\n(.*?)(?=^## |\Z)", re.S | re.M)
MARKED = re.compile(r"<!-- public-api:start -->\n(.*?)<!-- public-api:end -->", re.S)


def promised() -> list[str]:
    """The names listed as ``- `kdcore.X` ...`` between the markers of the doc's public API section."""
    section = SECTION.search(DOC.read_text(encoding="utf-8"))
    assert section, "docs/plugins.md has no '## The public API' section"
    marked = MARKED.search(section[1])
    assert marked, "the public API section has no <!-- public-api:start/end --> list"
    lines = [line for line in marked[1].splitlines() if line.strip()]
    names = [re.match(r"^- `kdcore\.(\w+)`", line) for line in lines]
    assert all(names), [line for line, m in zip(lines, names, strict=True) if not m]
    return [m[1] for m in names if m]


def test_all_is_exactly_what_the_guide_promises():
    names = promised()
    assert len(names) == len(set(names)), "a name is listed twice"
    assert set(names) == set(kdcore.__all__)
    assert len(kdcore.__all__) == len(set(kdcore.__all__))


def test_every_public_name_imports_without_torch():
    names = ", ".join(kdcore.__all__)
    code = (
        "import sys\n"
        f"from kdcore import {names}\n"
        "import kdcore\n"
        "missing = [n for n in kdcore.__all__ if not hasattr(kdcore, n)]\n"
        "assert not missing, missing\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def kdcore_imports(source: str, where: str) -> list[str]:
    """Problems: imports of kdcore submodules or of names outside ``kdcore.__all__``."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdcore":
            if node.module != "kdcore":
                problems.append(f"{where}:{node.lineno}: from {node.module} import ...")
                continue
            problems += [
                f"{where}:{node.lineno}: kdcore.{a.name} is not public"
                for a in node.names
                if a.name not in kdcore.__all__
            ]
        elif isinstance(node, ast.Import):
            problems += [
                f"{where}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("kdcore.")
            ]
    return problems


def plugin_sources() -> list:
    builtin = sorted((REPO / "plugins" / "kd_builtin").glob("*.py"))
    packages = sorted(
        path
        for path in (REPO / "plugins").glob("kd-plugin-*/**/*.py")
        if "tests" not in path.relative_to(REPO / "plugins").parts
    )
    return builtin + packages


#: Known departures, each with its reason (none today).
ALLOWED: set[tuple[str, str]] = set()


@pytest.mark.parametrize("path", plugin_sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_use_only_the_public_api(path):
    where = str(path.relative_to(REPO))
    problems = kdcore_imports(path.read_text(encoding="utf-8"), where)
    unexpected = [p for p in problems if (where, p.split(": ", 1)[1]) not in ALLOWED]
    assert unexpected == []


@pytest.mark.parametrize("kind", ["scorer", "pacing", "reliance", "divergence", "source"])
def test_generated_plugins_use_only_the_public_api(kind):
    from kdcore.scaffold import plugin_names, render

    files = render(plugin_names("api-check", kind))
    for path, text in files.items():
        if path.endswith(".py"):
            assert kdcore_imports(text, path) == []
