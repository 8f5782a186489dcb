"""``kd compare``: a grid of strategies × seeds against one teacher, at equal training compute.

Every arm shares one base run config (models, data, steps, batch, sequence length, optimizer,
schedule); an arm may change only ``strategy`` fields. The teacher is resolved once, to a
directory, before anything runs, and every arm and seed gets ``model.teacher=<that directory>``,
so a spec teacher is trained exactly once (with ``teacher_seed``, not the arms' seeds).

Layout of a comparison directory::

    compare.yaml                 the resolved plan (base config, arms, seeds, teacher): --resume reads it
    runs/<arm>/seed-<s>/         one ordinary ``kd run`` directory per arm and seed
    runs/<arm>/seed-<s>.log      that run's console output (and the traceback if it failed)
    comparison.json              every number of the table, per run and per arm
    comparison.md                the table and the paired comparisons
    ppl.png, curves.png          eval perplexity per arm (mean ± sd), eval curves (mean ± sd band)

Arms are given with ``--arm NAME=SPEC`` (the grammar is in :mod:`kdcore.compare.arms`).

Baselines added on top of the arms (so no comparison is unfair by construction):

- ``ce`` (reliance none) and ``kd`` (vanilla KD, reliance fixed) when no arm plays that role;
- the fixed-λ sweep ``kd@<λ>`` (default 0.1, 0.5, 0.9; ``kd`` itself stands for its own λ);
- ``kd@matched-<arm>`` for every arm whose reliance policy varies λ per sample: vanilla KD at the
  mean λ that arm actually used, per seed, run after that arm's run for the seed finishes;
- with ``--equal-time``, ``<arm>@equal-time`` for every arm whose source generates: that arm for the
  steps that take the ``kd`` run's training time on the same seed.

The package, in the order a comparison goes through it: :mod:`~kdcore.compare.arms` (the arm
grammar), :mod:`~kdcore.compare.plan` (the plan and its validation), :mod:`~kdcore.compare.check`
(every run dry-run before anything trains), :mod:`~kdcore.compare.execute`
(running it), :mod:`~kdcore.compare.stats` and :mod:`~kdcore.compare.results` (the numbers of
``comparison.json``), :mod:`~kdcore.compare.render` (``comparison.md`` and the plots).
"""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdcore.compare.arms import Arm, apply_patch, format_strategy, parse_arm
from kdcore.compare.check import check_runs
from kdcore.compare.execute import Comparison
from kdcore.compare.plan import PLAN, Plan, build_plan, validate_plan
from kdcore.compare.render import format_paired, render_markdown
from kdcore.compare.stats import paired_difference
from kdcore.errors import KdError
from kdcore.files import atomic_write_text, check_output_dir

__all__ = [
    "Arm",
    "Comparison",
    "Plan",
    "apply_patch",
    "build_plan",
    "compare",
    "default_output_dir",
    "format_paired",
    "format_strategy",
    "paired_difference",
    "parse_arm",
    "render_markdown",
    "resume",
    "table_only",
]


def default_output_dir() -> Path:
    return Path("comparisons") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_output(out_dir: Path) -> None:
    check_output_dir(out_dir, "--output-dir")
    if (out_dir / PLAN).exists():
        raise KdError(
            f"'{out_dir}' already holds a comparison; finish it with kd compare --resume {out_dir}, "
            "or choose another --output-dir"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KdError(f"output directory '{out_dir}' is not empty; choose another --output-dir")


def compare(
    plan: Plan, out_dir: Path, *, jobs: int = 1, log: Callable[[str], None] = print, console: Any = None
) -> dict[str, Any]:
    """Run a new comparison into ``out_dir`` (which must be new or empty).

    Every run is checked first (:func:`~kdcore.compare.check.check_runs`), and a refusal before the first
    arm trains (the teacher's training, the teacher cache) removes what was written: a refused comparison
    leaves no directory that ``--resume`` would only fail on again.
    """
    prepare_output(out_dir)
    check_runs(plan)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PLAN, plan.to_yaml())
    comparison = Comparison(plan, out_dir, jobs=jobs, log=log, console=console)
    try:
        return comparison.run()
    except KdError:
        if not comparison.training:
            _remove_contents(out_dir, remove_dir=created)
        raise


def _remove_contents(out_dir: Path, *, remove_dir: bool) -> None:
    """Empty ``out_dir`` (new or empty when the comparison began), and remove it when it was new."""
    for path in out_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if remove_dir:
        out_dir.rmdir()


def resume(
    out_dir: Path, *, jobs: int = 1, log: Callable[[str], None] = print, console: Any = None
) -> dict[str, Any]:
    """Finish a comparison: reuse every run with summary.json, redo the rest."""
    path = out_dir / PLAN
    if not path.is_file():
        raise KdError(
            f"'{out_dir}' is not a kd compare directory (no {PLAN}); pass the directory kd compare wrote"
        )
    plan = Plan.load(path)
    validate_plan(plan)
    check_runs(plan)
    return Comparison(plan, out_dir, jobs=jobs, log=log, console=console).run()


def table_only(out_dir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rebuild comparison.json/.md and the plots from the runs finished so far, running nothing."""
    path = out_dir / PLAN
    if not path.is_file():
        raise KdError(
            f"'{out_dir}' is not a kd compare directory (no {PLAN}); pass the directory kd compare wrote"
        )
    return Comparison(Plan.load(path), out_dir, log=log).collect()
