"""``comparison.json`` from the outcomes of the runs: per-run and per-arm numbers, references, paired tests."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcore.compare.arms import Arm, format_matched, format_strategy
from kdcore.compare.plan import Plan
from kdcore.compare.stats import mean_sd, paired_difference
from kdcore.references import gap_closed
from kdcore.summary import RunSummary

#: The fields of each run's summary that comparison.json repeats, per run.
RUN_FIELDS = (
    "student_eval_ppl",
    "teacher_eval_ppl",
    "student_initial_eval_ppl",
    "mean_lambda",
    "wall_seconds",
    "tokens_per_second",
    "train_tokens",
    "steps",
    "final_open_share",
    "onpolicy_kl",
    "generation_share",
    "eval_curve",
)


@dataclass
class RunOutcome:
    """One arm and seed: finished (with its summary), failed (with the error) or skipped."""

    arm: str
    seed: int
    status: str  # ok | failed | skipped
    run_dir: str
    summary: RunSummary | None = None
    error: str | None = None
    reused: bool = False  # finished before this invocation (--resume)

    def as_json(self) -> dict[str, Any]:
        summary = self.summary or RunSummary()
        return {
            "seed": self.seed,
            "status": self.status,
            "run_dir": self.run_dir,
            "error": self.error,
            **{name: summary[name] for name in RUN_FIELDS},
        }


def summarise(
    plan: Plan,
    derived_arms: Sequence[Arm],
    outcomes: Mapping[tuple[str, int], RunOutcome],
    teacher: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """comparison.json: per run and per arm numbers, references and paired tests."""
    arms = list(plan.arms)
    known = {a.name for a in arms}
    for source in plan.reliance_arms() if plan.matched else []:
        for m in derived_arms:
            if m.matched_to == source.name and m.name not in known:
                arms.append(m)
                known.add(m.name)
    for source in plan.timed_arms():
        arms += [t for t in derived_arms if t.timed_to == source.name and t.name not in known]
    table = _Outcomes(plan, outcomes)
    best_fixed = table.best_fixed(arms)
    return {
        "version": 1,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": plan.command,
        "seeds": plan.seeds,
        "teacher_seed": plan.teacher_seed,
        "notes": plan.notes,
        "teacher": {
            "source": plan.base["model"]["teacher"],
            "dir": plan.teacher_dir,
            "eval_ppl": table.teacher_ppl,
            "eval_ppl_sd": table.teacher_sd,
            **dict(teacher or {}),
        },
        "student": {"source": plan.base["model"]["student"], "params": (teacher or {}).get("student_params")},
        "base_config": {k: v for k, v in plan.base.items() if k != "strategy"},
        "references": {"ce": plan.ce.name, "kd": plan.kd.name, "best_fixed": best_fixed},
        "sweep": plan.sweep,
        "matched": plan.matched,
        "arms": [table.arm_row(arm, best_fixed) for arm in arms],
    }


class _Outcomes:
    """The runs' outcomes by arm and seed, and the numbers of comparison.json drawn from them."""

    def __init__(self, plan: Plan, outcomes: Mapping[tuple[str, int], RunOutcome]) -> None:
        self.plan, self.outcomes = plan, outcomes
        teacher_ppls = [float(o.summary.teacher_eval_ppl) for o in outcomes.values() if o.status == "ok"]
        self.teacher_ppl, self.teacher_sd = mean_sd(teacher_ppls)
        self.ce_by_seed = self.ppl_by_seed(plan.ce.name)

    def ppl_by_seed(self, name: str) -> dict[int, float]:
        return {
            seed: float(o.summary.student_eval_ppl)
            for (arm, seed), o in self.outcomes.items()
            if arm == name and o.status == "ok"
        }

    def gap(self, by_seed: Mapping[int, float]) -> float | None:
        """Gap closed on the means over the seeds both this arm and the CE arm finished."""
        common = sorted(set(by_seed) & set(self.ce_by_seed))
        if not common:
            return None
        ce_mean = mean_sd([self.ce_by_seed[s] for s in common])[0]
        return gap_closed(ce_mean, mean_sd([by_seed[s] for s in common])[0], self.teacher_ppl)

    def best_fixed(self, arms: Sequence[Arm]) -> str | None:
        """The fixed-λ arm with the lowest mean perplexity: the sweep points plus the kd arm (its own λ)."""
        names = [self.plan.kd.name] + [a.name for a in arms if a.role == "sweep"]
        best, best_mean = None, None
        for name in names:
            mean = mean_sd(list(self.ppl_by_seed(name).values()))[0]
            if mean is not None and (best_mean is None or mean < best_mean):
                best, best_mean = name, mean
        return best

    def arm_row(self, arm: Arm, best_fixed: str | None) -> dict[str, Any]:
        plan = self.plan
        runs = [self.outcomes[(arm.name, s)] for s in plan.seeds if (arm.name, s) in self.outcomes]
        ok = [o for o in runs if o.status == "ok"]
        failed = [o for o in runs if o.status != "ok"]
        ppl = self.ppl_by_seed(arm.name)
        mean, sd = mean_sd(list(ppl.values()))
        lam_mean, lam_sd = mean_sd([float(o.summary.mean_lambda) for o in ok])
        kl_mean, kl_sd = mean_sd(
            [float(o.summary.onpolicy_kl) for o in ok if o.summary.onpolicy_kl is not None]
        )
        matched = arm.role == "matched"
        return {
            "name": arm.name,
            "role": arm.role,
            "auto": arm.auto,
            "spec": arm.spec,
            "strategy": format_matched(arm.strategy) if matched else format_strategy(arm.strategy),
            "strategy_config": arm.strategy,
            "matched_to": arm.matched_to,
            "timed_to": arm.timed_to,
            "fixed_lambda": None if matched else arm.fixed_lambda(),
            "status": self.status(arm, runs),
            "error": failed[0].error if failed else None,
            "n_ok": len(ok),
            "n_seeds": len(plan.seeds),
            "ppl_mean": mean,
            "ppl_sd": sd,
            "gap_closed": None if arm.role == "ce" else self.gap(ppl),
            "mean_lambda": lam_mean,
            "mean_lambda_sd": lam_sd,
            "onpolicy_kl_mean": kl_mean,
            "onpolicy_kl_sd": kl_sd,
            "generation_share_mean": mean_sd([float(o.summary.generation_share or 0.0) for o in ok])[0],
            "steps_mean": mean_sd([float(o.summary.steps) for o in ok])[0],
            "train_seconds_mean": mean_sd([train_seconds(o.summary) for o in ok])[0],
            "wall_seconds_mean": mean_sd([float(o.summary.wall_seconds) for o in ok])[0],
            "tokens_per_second_mean": mean_sd([float(o.summary.tokens_per_second) for o in ok])[0],
            "runs": [o.as_json() for o in runs],
            "best_fixed": arm.name == best_fixed,
            "vs": self.paired(arm, ppl, best_fixed),
        }

    def status(self, arm: Arm, runs: Sequence[RunOutcome]) -> str:
        if not runs:
            return "not run"
        ok = any(o.status == "ok" for o in runs)
        complete = all(o.status == "ok" for o in runs) and len(runs) == len(self.plan.seeds)
        return "ok" if complete else ("partial" if ok else "failed")

    def paired(self, arm: Arm, ppl: Mapping[int, float], best_fixed: str | None) -> dict[str, Any]:
        """Paired tests of this arm against vanilla KD, its matched-λ baseline and the best fixed λ."""
        plan = self.plan
        references = []
        if arm.role != "kd":
            references.append(("kd", plan.kd.name))
        if arm.role == "arm" and arm.varies_lambda():
            if plan.matched:
                references.append(("matched", f"kd@matched-{arm.name}"))
            if best_fixed is not None and best_fixed != plan.kd.name:
                references.append(("best_fixed", best_fixed))
        return {
            key: paired_difference(ppl, self.ppl_by_seed(name), name).as_json() for key, name in references
        }


def train_seconds(summary: RunSummary) -> float:
    """Training time of a run (eval and checkpoints left out, generation included)."""
    return float(summary.train_tokens) / max(float(summary.tokens_per_second), 1e-9)
