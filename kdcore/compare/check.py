"""Every run of a comparison checked as ``kd run --dry-run`` checks it, before anything trains or is written.

Arms differ only in strategy, yet a strategy can make a run impossible (a source that learns from
nothing under reliance ``none``, continuations longer than the models' positions), and so can the base
config (a missing dataset, a batch larger than the data). Without this check such a run failed only
after other arms had trained, and ``--resume`` failed the same way again. The dry run is the run's own
set of checks (plugins, strategy parameters, the source's :meth:`~kdcore.strategies.Source.check`,
data, models' configs, vocabularies, batch size) with no weights loaded and no teacher trained.
"""

from __future__ import annotations

from pathlib import Path

from kdcore.compare.arms import Arm, matched_strategy
from kdcore.compare.plan import Plan, arm_config
from kdcore.config import RunConfig
from kdcore.errors import KdError

__all__ = ["check_runs"]


def check_runs(plan: Plan) -> None:
    """Dry-run the base config, then every arm and matched-λ baseline with a strategy of its own; one
    sentence (naming the arm) for the first that a run would refuse."""
    from kdcore.runs.dry_run import dry_run

    dry_run(RunConfig.model_validate(plan.base))  # what every arm shares: named without an arm
    seen: list[dict] = [plan.base["strategy"]]
    for arm in _arms(plan):
        if arm.strategy in seen:
            continue
        seen.append(arm.strategy)
        cfg = arm_config(plan, arm, plan.seeds[0], Path("unused"))
        try:
            dry_run(cfg)
        except KdError as exc:
            raise KdError(f"arm '{arm.name}': {exc}") from None


def _arms(plan: Plan) -> list[Arm]:
    """The arms as planned, then each matched-λ baseline (its λ, known only after its arm ran, at 0.5);
    equal-time runs are their arm's strategy for fewer steps."""
    matched = [
        Arm(f"kd@matched-{arm.name}", matched_strategy(arm.strategy, 0.5))
        for arm in (plan.reliance_arms() if plan.matched else [])
    ]
    return [*plan.arms, *matched]
