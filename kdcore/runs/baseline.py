"""``kd run --baseline``: the CE-only student trained beside a run, so the run can say whether the teacher helped.

The baseline is the run's config with the strategy's CE-only reference
(:func:`kdcore.references.reference_strategy`: no scorer, no pacing, reliance ``none``; the same
reference ``kd compare`` adds as its ``ce`` arm) and its own directory, ``RUN_DIR/baseline``: the
same data, tokenizer, student, steps, batch, schedule and seed, so it computes what ``kd run
--reliance none`` computes with that config, number for number. It reports to no tracker and pushes
nothing; the run's summary gets its perplexity and the share of the CE→teacher gap the run closed.
"""

from __future__ import annotations

from pathlib import Path

from kdcore.config import RunConfig
from kdcore.references import reference_strategy

#: The baseline's directory inside the run directory.
BASELINE_DIR = "baseline"


def baseline_config(cfg: RunConfig, run_dir: Path) -> RunConfig | None:
    """The config of ``cfg``'s CE-only student in ``run_dir/baseline``; None when ``cfg`` is that student."""
    strategy = cfg.strategy.model_dump(mode="json")
    reference = reference_strategy(strategy, "none")
    if reference == strategy:
        return None
    tree = cfg.to_dict()
    tree["strategy"] = reference
    tree["output"].update(
        dir=str(Path(run_dir) / BASELINE_DIR), baseline=False, report_to="none", push_to_hub=None
    )
    return RunConfig.model_validate(tree)
