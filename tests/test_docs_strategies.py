"""docs/strategies.md names every built-in strategy and every one of its parameters."""

from __future__ import annotations

from conftest import REPO

from kdcore.plugins import get_registry

DOC = (REPO / "docs" / "strategies.md").read_text()


def test_every_builtin_strategy_and_parameter_is_documented():
    missing = []
    for entry in get_registry().entries:
        if entry.distribution != "kdcore" or entry.cls is None:
            continue
        if f"`{entry.name}`" not in DOC:
            missing.append(f"{entry.kind} {entry.name}")
        missing += [
            f"{entry.kind} {entry.name}: {p}" for p in entry.cls.Params.model_fields if f"`{p}`" not in DOC
        ]
    assert not missing, missing
