"""The package's shape: import layers (import-linter), docs/architecture.md naming every module."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys

from conftest import REPO
from importlinter.cli import lint_imports

import kdcore

PYPROJECT = REPO / "pyproject.toml"
LINT = (
    "from importlinter.cli import lint_imports; "
    "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def test_import_contracts_are_kept(capsys):
    """pyproject.toml's contracts: layers inputs <- training <- teachers <- runs <- compare <- reports <- cli,
    and base modules that import none of them."""
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "2 kept, 0 broken" in report


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    """grimp sees imports inside functions too: a copy of kdcore whose inputs import the runner fails."""
    copy = tmp_path / "kdcore"
    shutil.copytree(REPO / "kdcore", copy, ignore=shutil.ignore_patterns("__pycache__"))
    demo = copy / "inputs" / "demo.py"
    demo.write_text(
        demo.read_text() + "\n\ndef _upward():\n    from kdcore.runs.runner import run\n\n    return run\n"
    )
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    result = subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "kdcore.inputs.demo -> kdcore.runs.runner" in result.stdout


def architecture_tree() -> set[str]:
    """The paths the tree in docs/architecture.md names (``inputs/corpus.py``), from its indentation."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```\nkdcore/\n(.*?)```", text, re.S).group(1)
    paths, parents = set(), []
    for line in block.splitlines():
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0] if line.strip() else ""
        if indent == 0 or not name:
            continue  # the tree's neighbours (plugins/...) and blank lines
        parents = parents[: indent - 1]
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
        paths.add("/".join([*parents, name.rstrip("/")]))
    return paths


def test_every_module_is_in_docs_architecture():
    package = REPO / "kdcore"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    named = architecture_tree()
    assert modules - named == set(), "add these modules to the tree in docs/architecture.md"
    stale = {p for p in named if p.endswith(".py")} - modules
    assert stale == set(), "docs/architecture.md names modules that do not exist"


def test_importing_every_module_keeps_the_public_api():
    """Subpackages never shadow a public name (a package kdcore/run/ would replace kdcore.run())."""
    for info in pkgutil.walk_packages(kdcore.__path__, "kdcore."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in kdcore.__all__:
        assert not inspect.ismodule(getattr(kdcore, name)), name
    assert inspect.isfunction(kdcore.run)
