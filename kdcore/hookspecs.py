"""The contract a kdcore plugin implements: one registration hook per strategy kind.

Each hook receives a ``register(name, cls)`` callback. ``cls`` subclasses the matching base class
from :mod:`kdcore.strategies`; its ``Params`` pydantic model declares the parameters users pass
with ``--scorer-arg key=value`` or YAML ``params:``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")
hookimpl = pluggy.HookimplMarker("kdcore")

Register = Callable[[str, type], None]


@hookspec
def kd_register_scorers(register: Register) -> None:
    """Register :class:`~kdcore.strategies.DifficultyScorer` classes."""


@hookspec
def kd_register_pacings(register: Register) -> None:
    """Register :class:`~kdcore.strategies.PacingFunction` classes."""


@hookspec
def kd_register_reliances(register: Register) -> None:
    """Register :class:`~kdcore.strategies.ReliancePolicy` classes."""


@hookspec
def kd_register_divergences(register: Register) -> None:
    """Register :class:`~kdcore.strategies.Divergence` classes."""


@hookspec
def kd_register_sources(register: Register) -> None:
    """Register :class:`~kdcore.strategies.Source` classes."""
