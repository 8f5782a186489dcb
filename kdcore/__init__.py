"""kdcore: knowledge distillation for language models with curriculum learning and selective reliance.

The public API a plugin or a script uses. Importing it does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcore.config import RunConfig, StrategySpec
from kdcore.errors import KdError, PluginError
from kdcore.hookspecs import hookimpl
from kdcore.strategies import (
    DifficultyScorer,
    Divergence,
    NoParams,
    PacingFunction,
    ReliancePolicy,
    ScorerContext,
    Strategy,
)

if TYPE_CHECKING:
    from kdcore.runs.runner import RunResult

__version__ = "0.1.0"

__all__ = [
    "DifficultyScorer",
    "Divergence",
    "KdError",
    "NoParams",
    "PacingFunction",
    "PluginError",
    "ReliancePolicy",
    "RunConfig",
    "ScorerContext",
    "Strategy",
    "StrategySpec",
    "__version__",
    "create_strategy",
    "hookimpl",
    "run",
]


def create_strategy(kind: str, name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Build an installed strategy by kind (scorer, pacing, reliance, divergence) and name.

    For strategies that compose others (e.g. a policy wrapping an inner policy); parameters are validated and an
    unknown name raises :class:`PluginError` listing the known ones.
    """
    from kdcore.plugins import get_registry

    return get_registry().create(kind, name, params)


def run(config: RunConfig | dict[str, Any] | None = None, **kwargs: Any) -> RunResult:
    """Run one distillation and return its result (summary and run directory).

    ``config`` is a :class:`RunConfig` or a mapping in its YAML shape; keyword arguments are passed
    on to :func:`kdcore.runs.runner.run` (``console``, ``show_progress``, and ``resume=True`` to continue
    the unfinished run in ``config.output.dir`` from its newest valid checkpoint).
    """
    from kdcore.runs.runner import run as _run

    if config is None or isinstance(config, dict):
        config = RunConfig.model_validate(config or {})
    return _run(config, **kwargs)
