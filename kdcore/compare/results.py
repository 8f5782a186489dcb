"""``comparison.json`` from the outcomes of the runs: per-run and per-arm numbers, references, paired tests."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdcore.compare.arms import Arm, format_strategy
from kdcore.compare.plan import Plan
from kdcore.compare.stats import gap_closed, mean_sd, paired_difference


@dataclass
class RunOutcome:
    arm: str
    seed: int
    status: str  # ok | failed | skipped
    run_dir: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    reused: bool = False  # finished before this invocation (--resume)

    def as_json(self) -> dict[str, Any]:
        s = self.summary or {}
        return {
            "seed": self.seed,
            "status": self.status,
            "run_dir": self.run_dir,
            "error": self.error,
            "student_eval_ppl": s.get("student_eval_ppl"),
            "teacher_eval_ppl": s.get("teacher_eval_ppl"),
            "student_initial_eval_ppl": s.get("student_initial_eval_ppl"),
            "mean_lambda": s.get("mean_lambda"),
            "wall_seconds": s.get("wall_seconds"),
            "tokens_per_second": s.get("tokens_per_second"),
            "train_tokens": s.get("train_tokens"),
            "steps": s.get("steps"),
            "final_open_share": s.get("final_open_share"),
            "eval_curve": s.get("eval_curve"),
        }


def summarise(
    plan: Plan,
    matched_arms: Sequence[Arm],
    outcomes: Mapping[tuple[str, int], RunOutcome],
    teacher: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """comparison.json: per run and per arm numbers, references and paired tests."""
    arms = list(plan.arms)
    known = {a.name for a in arms}
    for source in plan.reliance_arms() if plan.matched else []:
        for m in matched_arms:
            if m.matched_to == source.name and m.name not in known:
                arms.append(m)
                known.add(m.name)

    def ppl_by_seed(name: str) -> dict[int, float]:
        return {
            seed: float(o.summary["student_eval_ppl"])
            for (arm, seed), o in outcomes.items()
            if arm == name and o.status == "ok"
        }

    ok_runs = [o for o in outcomes.values() if o.status == "ok"]
    teacher_ppls = [float(o.summary["teacher_eval_ppl"]) for o in ok_runs]
    teacher_ppl, teacher_sd = mean_sd(teacher_ppls)
    ce_by_seed = ppl_by_seed(plan.ce.name)

    def gap(by_seed: Mapping[int, float]) -> float | None:
        """Gap closed on the means over the seeds both this arm and the CE arm finished."""
        common = sorted(set(by_seed) & set(ce_by_seed))
        if not common:
            return None
        ce_mean = mean_sd([ce_by_seed[s] for s in common])[0]
        return gap_closed(ce_mean, mean_sd([by_seed[s] for s in common])[0], teacher_ppl)

    # the best fixed λ: the sweep points plus the kd arm (its own λ)
    sweep_points = [(plan.kd.fixed_lambda(), plan.kd.name)] + [
        (a.fixed_lambda(), a.name) for a in arms if a.role == "sweep"
    ]
    best_fixed = None
    best_mean = None
    for _lam, name in sweep_points:
        mean = mean_sd(list(ppl_by_seed(name).values()))[0]
        if mean is not None and (best_mean is None or mean < best_mean):
            best_fixed, best_mean = name, mean

    rows = []
    for arm in arms:
        runs = [outcomes[(arm.name, s)] for s in plan.seeds if (arm.name, s) in outcomes]
        ok = [o for o in runs if o.status == "ok"]
        ppl = ppl_by_seed(arm.name)
        mean, sd = mean_sd(list(ppl.values()))
        lam_mean, lam_sd = mean_sd([float(o.summary["mean_lambda"]) for o in ok])
        wall = mean_sd([float(o.summary["wall_seconds"]) for o in ok])[0]
        tps = mean_sd([float(o.summary["tokens_per_second"]) for o in ok])[0]
        failed = [o for o in runs if o.status != "ok"]
        missing = [s for s in plan.seeds if (arm.name, s) not in outcomes]
        status = "ok" if ok and not failed and not missing else ("failed" if not ok else "partial")
        if not runs:
            status = "not run"
        row: dict[str, Any] = {
            "name": arm.name,
            "role": arm.role,
            "auto": arm.auto,
            "spec": arm.spec,
            "strategy": format_strategy(arm.strategy)
            if arm.role != "matched"
            else "reliance:fixed(value=matched)",
            "strategy_config": arm.strategy,
            "matched_to": arm.matched_to,
            "fixed_lambda": arm.fixed_lambda() if arm.role != "matched" else None,
            "status": status,
            "error": failed[0].error if failed else None,
            "n_ok": len(ok),
            "n_seeds": len(plan.seeds),
            "ppl_mean": mean,
            "ppl_sd": sd,
            "gap_closed": None if arm.role == "ce" else gap(ppl),
            "mean_lambda": lam_mean,
            "mean_lambda_sd": lam_sd,
            "wall_seconds_mean": wall,
            "tokens_per_second_mean": tps,
            "runs": [o.as_json() for o in runs],
            "best_fixed": arm.name == best_fixed,
        }
        comparisons: dict[str, Any] = {}
        if arm.role not in ("kd",):
            comparisons["kd"] = paired_difference(ppl, ppl_by_seed(plan.kd.name), plan.kd.name).as_json()
        if arm.role == "arm" and arm.varies_lambda():
            matched_name = f"kd@matched-{arm.name}"
            if plan.matched:
                comparisons["matched"] = paired_difference(
                    ppl, ppl_by_seed(matched_name), matched_name
                ).as_json()
            if best_fixed is not None and best_fixed != plan.kd.name:
                comparisons["best_fixed"] = paired_difference(
                    ppl, ppl_by_seed(best_fixed), best_fixed
                ).as_json()
        row["vs"] = comparisons
        rows.append(row)

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
            "eval_ppl": teacher_ppl,
            "eval_ppl_sd": teacher_sd,
            **dict(teacher or {}),
        },
        "student": {"source": plan.base["model"]["student"], "params": (teacher or {}).get("student_params")},
        "base_config": {k: v for k, v in plan.base.items() if k != "strategy"},
        "references": {"ce": plan.ce.name, "kd": plan.kd.name, "best_fixed": best_fixed},
        "sweep": plan.sweep,
        "matched": plan.matched,
        "arms": rows,
    }
