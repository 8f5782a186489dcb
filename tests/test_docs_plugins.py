"""docs/plugins.md stays true: its python blocks run, its signatures match the code."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
from conftest import REPO

import kdcore
from kdcore import hookspecs
from kdcore.strategies import (
    DifficultyScorer,
    Divergence,
    PacingFunction,
    ReliancePolicy,
    Source,
    SourceRequest,
    Strategy,
)

DOC = REPO / "docs" / "plugins.md"
FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
#: Languages a block may have; only python is executed.
LANGUAGES = {"python", "bash", "toml", "yaml", "text"}


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the first code line, code) for every fenced block, in order."""
    return [(m[1], text.count("\n", 0, m.start(2)) + 1, m[2]) for m in FENCE.finditer(text)]


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def signature(func) -> str:
    """``name(args) -> ret`` as the source spells it (annotations are strings here)."""
    return f"{func.__name__}{inspect.signature(func)}".replace("'", "")


def test_every_block_has_a_known_language(doc):
    found = blocks(doc)
    assert found, "no fenced blocks found"
    assert doc.count("```") == 2 * len(found), "an unbalanced ``` fence"
    for lang, line, _ in found:
        assert lang in LANGUAGES, (
            f"docs/plugins.md:{line}: block language {lang!r} not in {sorted(LANGUAGES)}"
        )


def test_python_blocks_run_in_order_in_one_namespace(doc):
    code_blocks = [(line, code) for lang, line, code in blocks(doc) if lang == "python"]
    assert len(code_blocks) >= 6
    namespace: dict = {"__name__": "docs_plugins"}
    for line, code in code_blocks:
        # pad so that a traceback points at the line of docs/plugins.md
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    # the guide's complete plugin exists, subclasses the public base class and was driven
    assert issubclass(namespace["Forgetting"], kdcore.DifficultyScorer)
    assert namespace["scores"][0] == 1.0


def test_python_blocks_import_only_the_public_api(doc):
    code = "\n".join(c for lang, _, c in blocks(doc) if lang == "python")
    import kdcore.testing

    public = {"kdcore": kdcore.__all__, "kdcore.testing": kdcore.testing.__all__}  # the latter for tests
    for module, names in re.findall(r"^from (kdcore\S*) import (.+)$", code, re.M):
        assert module in public, f"the guide imports from {module}: only `kdcore` is public"
        for name in re.split(r"[,\s()]+", names):
            assert not name or name in public[module], f"{module}.{name} is not in its __all__"
    assert not re.search(r"^import kdcore\.", code, re.M)


def test_hook_signatures_are_exact(doc):
    python = "\n".join(c for lang, _, c in blocks(doc) if lang == "python")
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("kd_")]
    assert len(specs) == 5
    for spec in specs:
        assert f"def {signature(spec)}: ..." in python, f"docs/plugins.md: hook {spec.__name__}"
    assert "Register = Callable[[str, type], None]" in python
    assert hookspecs.Register == Callable[[str, type], None]


@pytest.mark.parametrize(
    ("cls", "methods"),
    [
        (DifficultyScorer, ["prepare", "observe", "scores"]),
        (PacingFunction, ["fraction"]),
        (ReliancePolicy, ["weights", "temperature"]),
        (Divergence, ["per_token"]),
        (Source, ["generates", "has_labels", "check", "rows"]),
        (SourceRequest, ["prompts", "generate", "coin", "with_rows"]),
        (Strategy, ["state_dict", "load_state_dict"]),
    ],
)
def test_interface_signatures_are_exact(doc, cls, methods):
    # every public method of the interface is documented ...
    public = {
        name
        for name, member in vars(cls).items()
        if inspect.isfunction(member) and not name.startswith("_") and name != "summary"
    }
    assert public == set(methods)
    # ... with its exact signature, as inline code
    for name in methods:
        assert f"`{signature(getattr(cls, name))}`" in doc, f"docs/plugins.md: {cls.__name__}.{name}"


def test_documented_environment_switches_and_commands_exist(doc):
    import kdcore.plugins as plugins

    source = inspect.getsource(plugins)
    for switch in ("KD_DISABLE_PLUGINS", "KD_TRACE_PLUGINS"):
        assert switch in doc and switch in source
    assert plugins.ENTRY_POINT_GROUP == "kdcore" and "[project.entry-points.kdcore]" in doc
    assert plugins._NAME.pattern in doc  # the registration name rule
    from kdcore.cli import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert {"run", "list-plugins", "new-plugin"} <= commands
