"""The registry: built-ins through entry points, broken and clashing plugins, the list-plugins CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_kd, write_fake_distribution

from kdcore.errors import PluginError
from kdcore.plugins import build_registry, get_registry

GOOD_PLUGIN = """
    from kdcore import PacingFunction, hookimpl

    class Half(PacingFunction):
        '''Half the data, always.'''
        def fraction(self, step, total_steps):
            return 0.5

    @hookimpl
    def kd_register_pacings(register):
        register("half", Half)
"""


def test_builtins_arrive_through_the_entry_point_group():
    registry = get_registry()
    for kind, name in [("reliance", "fixed"), ("reliance", "none"), ("scorer", "none"), ("pacing", "none")]:
        entry = registry.entry(kind, name)
        assert entry.distribution == "kdcore"
        assert entry.status == "ok"
        assert entry.description


def test_unknown_name_lists_known_ones_and_suggests():
    with pytest.raises(PluginError) as exc:
        get_registry().entry("reliance", "fixd")
    message = str(exc.value)
    assert message.startswith("unknown reliance 'fixd'; known: ")
    assert "fixed" in message and "none" in message
    assert "(did you mean 'fixed'?)" in message


def test_bad_params_name_the_field():
    with pytest.raises(
        PluginError, match=r"bad parameters for reliance 'fixed': value: .*less than or equal to 1"
    ):
        get_registry().create("reliance", "fixed", {"value": 3})


def _registry_with(tmp_path, monkeypatch, *dists):
    for name, version, eps, modules in dists:
        write_fake_distribution(tmp_path, name, version, eps, modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return build_registry()


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path, monkeypatch):
    registry = _registry_with(
        tmp_path,
        monkeypatch,
        (
            "kd-broken",
            "0.1",
            {"broken": "kd_broken_mod"},
            {"kd_broken_mod": "raise ImportError('no module named shiny')"},
        ),
        ("kd-good", "1.2", {"good": "kd_good_mod"}, {"kd_good_mod": GOOD_PLUGIN}),
    )
    broken = [e for e in registry.entries if e.status == "broken"]
    assert len(broken) == 1
    assert broken[0].distribution == "kd-broken"
    assert "no module named shiny" in broken[0].error
    half = registry.entry("pacing", "half")
    assert (half.distribution, half.version, half.description) == ("kd-good", "1.2", "Half the data, always.")
    assert registry.entry("reliance", "fixed").status == "ok"


def test_duplicate_name_is_an_error_naming_both_distributions(tmp_path, monkeypatch):
    clash = GOOD_PLUGIN.replace('"half"', '"none"')
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-clash", "0.3", {"clash": "kd_clash_mod"}, {"kd_clash_mod": clash})
    )
    with pytest.raises(PluginError, match=r"pacing 'none' is registered by both kdcore and kd-clash"):
        registry.entry("pacing", "none")


def test_wrong_hook_signature_is_one_readable_line(tmp_path, monkeypatch):
    bad = """
        from kdcore import hookimpl

        @hookimpl
        def kd_register_pacings(register, extra):
            pass
    """
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-badsig", "0.1", {"badsig": "kd_badsig_mod"}, {"kd_badsig_mod": bad})
    )
    (entry,) = [e for e in registry.entries if e.distribution == "kd-badsig"]
    assert entry.status == "broken"
    assert "extra" in entry.error and "\n" not in entry.error


def test_class_missing_a_method_is_rejected_at_registration(tmp_path, monkeypatch):
    incomplete = """
        from kdcore import PacingFunction, hookimpl

        class Lazy(PacingFunction):
            '''Forgot fraction().'''

        @hookimpl
        def kd_register_pacings(register):
            register("lazy", Lazy)
    """
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-lazy", "0.1", {"lazy": "kd_lazy_mod"}, {"kd_lazy_mod": incomplete})
    )
    with pytest.raises(PluginError, match=r"Lazy does not implement fraction"):
        registry.entry("pacing", "lazy")


def test_disable_plugins_keeps_only_builtins(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-good")
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-good", "1.2", {"good": "kd_good_mod"}, {"kd_good_mod": GOOD_PLUGIN})
    )
    assert "half" not in registry.names("pacing")
    assert "none" in registry.names("pacing")


def test_list_plugins_json_schema_and_broken_plugin_in_a_real_cli(tmp_path):
    write_fake_distribution(
        tmp_path, "kd-broken", "0.1", {"broken": "kd_broken_mod"}, {"kd_broken_mod": "1/0"}
    )
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = run_kd("list-plugins", "--json", env_extra=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    keys = {"kind", "name", "description", "distribution", "version", "status", "error"}
    assert all(set(row) == keys for row in rows)
    assert {(r["kind"], r["name"]) for r in rows if r["status"] == "ok"} >= {
        ("reliance", "fixed"),
        ("reliance", "none"),
        ("scorer", "none"),
        ("pacing", "none"),
    }
    (broken,) = [r for r in rows if r["status"] == "broken"]
    assert "ZeroDivisionError" in broken["error"]
    table = run_kd("list-plugins", env_extra=env)
    assert table.returncode == 0 and "broken" in table.stdout and "fixed" in table.stdout


def test_cli_start_up_never_imports_torch():
    code = (
        "import sys; from kdcore.cli import app; from kdcore.plugins import get_registry; get_registry(); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_trace_plugins_prints_hook_calls():
    result = run_kd("list-plugins", "--json", env_extra={"KD_TRACE_PLUGINS": "1"})
    assert result.returncode == 0
    assert "[kd plugins] kd_register_reliances" in result.stderr


def test_disable_all_keeps_only_kdcore(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "all")
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-good", "1.2", {"good": "kd_good_mod"}, {"kd_good_mod": GOOD_PLUGIN})
    )
    assert {e.distribution for e in registry.entries} == {"kdcore"}
    assert "none" in registry.names("pacing")


def test_rejected_registrations_and_raising_hooks_are_broken_and_the_rest_still_registers(
    tmp_path, monkeypatch
):
    mixed = """
        from pydantic import BaseModel
        from kdcore import PacingFunction, ReliancePolicy, hookimpl

        class Half(PacingFunction):
            '''Half the data, always.'''
            def fraction(self, step, total_steps):
                return 0.5

        class NotPacing(ReliancePolicy):
            def weights(self, rank, score, progress):
                return rank

        class DictParams(Half):
            Params = dict

        @hookimpl
        def kd_register_pacings(register):
            register("Bad Name", Half)
            register("not-a-class", 3)
            register("wrong-base", NotPacing)
            register("dict-params", DictParams)
            register("half", Half)

        @hookimpl
        def kd_register_reliances(register):
            raise RuntimeError("no policies today")
    """
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-mixed", "0.1", {"mixed": "kd_mixed_mod"}, {"kd_mixed_mod": mixed})
    )
    mine = {(e.kind, e.name): e for e in registry.entries if e.distribution == "kd-mixed"}
    assert registry.entry("pacing", "half").status == "ok"
    for name, reason in [
        ("Bad Name", "must be lower-case"),
        ("not-a-class", "is not a subclass of kdcore.PacingFunction"),
        ("wrong-base", "is not a subclass of kdcore.PacingFunction"),
        ("dict-params", "DictParams.Params must be a pydantic BaseModel"),
    ]:
        entry = mine[("pacing", name)]
        assert entry.status == "broken" and reason in entry.error, (name, entry.error)
    raised = mine[("reliance", "mixed")]
    assert raised.status == "broken" and "RuntimeError: no policies today" in raised.error
    assert registry.entry("reliance", "fixed").status == "ok"


def test_duplicate_marks_both_entries(tmp_path, monkeypatch):
    clash = GOOD_PLUGIN.replace('"half"', '"none"')
    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-clash", "0.3", {"clash": "kd_clash_mod"}, {"kd_clash_mod": clash})
    )
    both = [e for e in registry.entries if (e.kind, e.name) == ("pacing", "none")]
    assert sorted((e.distribution, e.status) for e in both) == [
        ("kd-clash", "duplicate"),
        ("kdcore", "duplicate"),
    ]


def test_one_table_of_strategy_kinds():
    """Each kind of kdcore.strategies.KINDS has its hook, its config field, and no module lists kinds again."""
    import re
    from pathlib import Path

    from kdcore import hookspecs
    from kdcore.config import StrategyConfig
    from kdcore.strategies import KINDS, Strategy

    hooks = {name for name in dir(hookspecs) if name.startswith("kd_register_")}
    assert hooks == {kind.hook for kind in KINDS.values()}
    for name, kind in KINDS.items():
        assert kind.name == name and issubclass(kind.base, Strategy) and kind.base is not Strategy
        assert name in StrategyConfig.model_fields
    assert list(StrategyConfig().names()) == list(KINDS)
    listing = re.compile(r"[\"']" + r"[\"'],\s*[\"']".join(KINDS) + r"[\"']")
    package = Path(hookspecs.__file__).parent
    again = [str(p.relative_to(package)) for p in package.rglob("*.py") if listing.search(p.read_text())]
    assert again == [], f"list the strategy kinds through kdcore.strategies.KINDS, not literally: {again}"


def test_kd_run_warns_in_one_line_when_a_plugin_failed_to_load(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import kdcore.plugins
    from kdcore.cli import app

    registry = _registry_with(
        tmp_path, monkeypatch, ("kd-broken", "0.1", {"broken": "kd_broken_mod"}, {"kd_broken_mod": "1/0"})
    )
    monkeypatch.setattr(kdcore.plugins, "get_registry", lambda: registry)
    result = CliRunner().invoke(app, ["run", "--print-config"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: plugin 'broken' from kd-broken failed to load: ZeroDivisionError: division by zero; "
        "kd list-plugins shows it"
    ]
    assert "warning" not in result.stdout  # the YAML stays clean


def test_kd_run_help_names_plugin_sources_too(tmp_path):
    """--source's help listed the built-in sources only; it names every installed one now."""
    source = """
        from kdcore import Source, hookimpl

        class Echo(Source):
            '''The dataset's rows, echoed.'''

            def rows(self, request):
                return request.dataset

        @hookimpl
        def kd_register_sources(register):
            register("echo-rows", Echo)
    """
    write_fake_distribution(
        tmp_path, "kd-plugin-echo", "0.1", {"echo": "kd_echo_mod"}, {"kd_echo_mod": source}
    )
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "400"}
    result = run_kd("run", "--help", env_extra=env)
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if "--source " in ln)
    assert "Where rows come from: dataset, echo-rows, mixed, on-policy, teacher-generated (dataset is" in line
