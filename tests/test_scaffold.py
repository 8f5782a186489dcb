"""`kd new-plugin`: the package it writes installs, registers, lints and passes its own tests."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_kd
from typer.testing import CliRunner

from kdcore.cli import app
from kdcore.errors import KdError
from kdcore.scaffold import KIND_CHOICES, plugin_names, write_plugin

PROBE_PREFIX = "kd-plugin-scaffold-probe-"


def pip(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def pytest_in(directory: Path) -> subprocess.CompletedProcess:
    """Run a generated package's own tests, from its directory (its pyproject's pytest config)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=directory,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def _build_isolation() -> list[str]:
    """``--no-build-isolation`` (offline, fast) when this environment's setuptools can build the package.

    A Python 3.11 venv ships setuptools 65, which cannot build an editable wheel without the
    ``wheel`` package; setuptools >= 70.1 can. With an older one pip builds in isolation (from PyPI).
    """
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return []
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
    return ["--no-build-isolation"] if parts >= (70, 1) else []


def _remove_stale_probes() -> None:
    """A probe left installed by a killed test run would show up as a broken plugin for everyone."""
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.startswith(PROBE_PREFIX):
            pid = name.rsplit("-", 1)[-1]
            alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
            if not alive:
                pip("uninstall", "-y", name)


@pytest.fixture
def installed_probe(tmp_path):
    """A generated scorer plugin, pip-installed (editable) into this environment for the test only."""
    _remove_stale_probes()
    name = f"scaffold-probe-{os.getpid()}"
    target = write_plugin(name, "scorer", tmp_path)
    result = pip("install", "--no-deps", *_build_isolation(), "-q", "-e", str(target))
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        yield name, target
    finally:
        pip("uninstall", "-y", f"kd-plugin-{name}")
        shutil.rmtree(target, ignore_errors=True)


def test_generated_plugin_installs_lists_and_passes_its_tests(installed_probe):
    name, target = installed_probe
    listed = run_kd("list-plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [r for r in json.loads(listed.stdout) if r["name"] == name]
    assert [(r["kind"], r["distribution"], r["version"], r["status"]) for r in rows] == [
        ("scorer", f"kd-plugin-{name}", "0.1.0", "ok")
    ]
    assert rows[0]["description"].startswith("The student's latest loss")

    tests = pytest_in(target)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "passed" in tests.stdout and "skipped" not in tests.stdout  # the entry-point test ran too

    # the strategy is usable by name, with its parameters validated like a built-in's
    config = run_kd("run", "--scorer", name, "--scorer-arg", "signal=confidence", "--print-config")
    assert config.returncode == 0, config.stderr
    assert f"name: {name}" in config.stdout and "signal: confidence" in config.stdout
    bad = run_kd("run", "--scorer", name, "--scorer-arg", "signal=vibes", "--print-config")
    assert bad.returncode == 2 and f"bad parameters for scorer '{name}': signal:" in bad.stderr


@pytest.mark.parametrize("kind", [k for k in KIND_CHOICES if k != "scorer"])
def test_other_kinds_pass_their_own_tests_and_lint_clean(tmp_path, kind):
    target = write_plugin(f"probe-{kind}", kind, tmp_path)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(
        [
            ".gitignore",
            "README.md",
            "pyproject.toml",
            f"kd_plugin_probe_{kind}/__init__.py",
            f"tests/test_probe_{kind}.py",
        ]
    )
    # not installed: the tests import the module from the package directory and skip the entry-point check
    tests = pytest_in(target)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "1 skipped" in tests.stdout and "pip install -e ." in tests.stdout
    if shutil.which("ruff"):
        for check in (["check", "."], ["format", "--check", "."]):
            lint = subprocess.run(["ruff", *check], cwd=target, capture_output=True, text=True)
            assert lint.returncode == 0, lint.stdout + lint.stderr


def test_module_docstring_is_the_quick_guide_and_no_torch_at_import(tmp_path):
    target = write_plugin("quick-guide", "reliance", tmp_path)
    source = (target / "kd_plugin_quick_guide" / "__init__.py").read_text()
    assert source.startswith('"""kd-plugin-quick-guide: the kdcore reliance policy')
    assert "Quick guide" in source and "--reliance-arg" in source and "docs/plugins.md" in source
    pyproject = (target / "pyproject.toml").read_text()
    assert '[project.entry-points.kdcore]\nquick-guide = "kd_plugin_quick_guide"' in pyproject
    code = "import sys, kd_plugin_quick_guide; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=target, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "bad",
    ["", "Loss-trend", "loss_trend", "-loss", "loss-", "loss--trend", "9lives", "loss trend", "x" * 31],
)
def test_invalid_names_are_one_sentence(bad, tmp_path):
    with pytest.raises(KdError, match=r"^plugin name .* is not valid: use lower-case letters") as info:
        write_plugin(bad, "scorer", tmp_path)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_names_derive_package_module_and_class():
    names = plugin_names("loss-trend2", "pacing")
    assert (names.dist, names.module, names.cls, names.test_module) == (
        "kd-plugin-loss-trend2",
        "kd_plugin_loss_trend2",
        "LossTrend2",
        "test_loss_trend2",
    )
    assert plugin_names("divergence", "divergence").cls == "DivergenceStrategy"  # no shadowed import
    with pytest.raises(KdError, match="without the 'kd-plugin-' prefix"):
        plugin_names("kd-plugin-foo", "scorer")
    with pytest.raises(KdError, match="unknown plugin kind 'loss'; choose one of scorer, pacing"):
        plugin_names("foo", "loss")


def test_refuses_to_overwrite_an_existing_directory(tmp_path):
    existing = tmp_path / "kd-plugin-mine"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(KdError, match=r"already exists; remove it or choose another --output-dir"):
        write_plugin("mine", "scorer", tmp_path)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd-plugin-mine"]  # no staging left behind


def test_refuses_a_name_already_registered_for_the_kind(tmp_path):
    with pytest.raises(KdError, match=r"pacing 'linear' is already provided by kdcore"):
        write_plugin("linear", "pacing", tmp_path)
    assert write_plugin("linear", "scorer", tmp_path).is_dir()  # other kinds have their own names


def test_cli_command(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["new-plugin", "my-pace", "--kind", "pacing", "--output-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "kd-plugin-my-pace" / "kd_plugin_my_pace" / "__init__.py").is_file()
    assert "pip install -e" in ok.output and "kd run --pacing my-pace" in ok.output
    again = runner.invoke(app, ["new-plugin", "my-pace", "--kind", "pacing", "--output-dir", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["new-plugin", "My_Pace", "--output-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "is not valid" in bad.output and "Traceback" not in bad.output


def test_every_package_and_template_ships_in_a_non_editable_install():
    """pyproject.toml lists every package under kdcore/ and the templates as package data; an editable
    install (the one tests run against) would not notice a missing one."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "kdcore").rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages | {"kdcore.scaffold.templates", "kd_builtin"}
    assert setuptools["package-data"]["kdcore.scaffold.templates"] == ["*"]
    templates = REPO / "kdcore" / "scaffold" / "templates"
    assert all(path.is_file() for path in templates.iterdir())  # flat, so "*" takes every one


def test_the_reliance_template_has_lambda_unknown_as_docs_plugins_asks(tmp_path):
    """docs/plugins.md asks reliance policies to let users set unknown samples' λ with lambda_unknown."""
    import importlib.util

    assert "with a `lambda_unknown` parameter" in " ".join((REPO / "docs" / "plugins.md").read_text().split())
    target = write_plugin("unknown-lambda", "reliance", tmp_path)
    spec = importlib.util.spec_from_file_location(
        "probe", target / "kd_plugin_unknown_lambda" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    policy = module.UnknownLambda(module.UnknownLambda.Params(lambda_unknown=0.9))
    assert policy.weights(torch.tensor([float("nan")]), torch.tensor([float("nan")]), 0.0).tolist() == [
        pytest.approx(0.9)
    ]
    assert "`lambda_unknown`" in (target / "README.md").read_text()
