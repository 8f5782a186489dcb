"""kd compare: strategies × seeds against one teacher at equal compute; --resume, --table-only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kdcore.cli.common import err, friendly_errors, log, offline_hint, out
from kdcore.cli.options import (
    RUN_OPTIONS,
    TRAIN_SHARE_HELP,
    Dataset,
    Opt,
    SeqLen,
    config_file,
    given_flags,
    set_fields,
    with_sets,
)
from kdcore.errors import KdError


@friendly_errors
def compare(
    arm: Annotated[
        list[str] | None,
        Opt(
            "--arm",
            help="NAME=SPEC, e.g. kd-cl-sr=scorer:student-snapshot,pacing:root,reliance:threshold(quantile=0.7) "
            "(repeatable; see docs/comparing.md).",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        Opt(
            help="Named arm set: seed-paper = ce, kd, kd-cl, kd-cl-sr, kd-cl-sr-teacher; seed-paper-multi-epoch = "
            "those and kd-cl-sr-inverted, in a data-limited many-epoch regime (docs/comparing.md)."
        ),
    ] = None,
    config: Annotated[
        Path | None, config_file("YAML: a base run config plus arms:, seeds:, teacher_seed:.")
    ] = None,
    teacher: Annotated[str | None, Opt(help="Teacher: directory, hub id or spec (trained once).")] = None,
    student: Annotated[str | None, Opt(help="Student: hub id, directory or from-scratch spec.")] = None,
    tokenizer: Annotated[str | None, Opt(help="For a spec teacher: 'byte' or 'bpe:vocab_size=N'.")] = None,
    teacher_steps: Annotated[int | None, Opt(help="Training steps of a spec teacher.")] = None,
    dataset: Dataset = None,
    eval_dataset: Annotated[str | None, Opt(help="Evaluation data (default: held-out tail).")] = None,
    seq_len: SeqLen = None,
    train_share: Annotated[float | None, Opt(help=TRAIN_SHARE_HELP)] = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps of every arm.")] = None,
    batch_size: Annotated[int | None, Opt(help="Samples per step of every arm.")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate of every arm.")] = None,
    seeds: Annotated[str | None, Opt(help="Comma-separated seeds, e.g. 0,1,2 (default 0,1,2).")] = None,
    teacher_seed: Annotated[int | None, Opt(help="Seed of the spec teacher's training (default 0).")] = None,
    sweep: Annotated[
        str | None, Opt(help="Fixed-λ sweep for the best-fixed-λ baseline (default 0.1,0.5,0.9; 'none').")
    ] = None,
    matched: Annotated[
        bool | None,
        Opt("--matched/--no-matched", help="Add vanilla KD at each reliance arm's mean λ (default on)."),
    ] = None,
    teacher_cache: Annotated[
        str | None,
        Opt(
            help="One teacher cache for every arm: 'auto' builds it once in the comparison directory, "
            "DIR uses a kd cache-teacher output (default: none, live teacher)."
        ),
    ] = None,
    teacher_cache_k: Annotated[
        int | None,
        Opt(help="Top-K of an auto cache (default: the whole vocabulary up to 512 tokens, else 64)."),
    ] = None,
    equal_time: Annotated[
        bool | None,
        Opt(
            "--equal-time/--equal-steps",
            help="Also run every arm whose source generates for the steps that take the kd arm's training "
            "time on the same seed, as ARM@equal-time (default: equal steps only).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, set_fields("Any base config field, e.g. --set data.max_eval_samples=64.")
    ] = None,
    output_dir: Annotated[
        Path | None, Opt(help="Comparison directory (default comparisons/<timestamp>).")
    ] = None,
    jobs: Annotated[int, Opt(help="Arm-runs in parallel (subprocesses, threads = cores // jobs each).")] = 1,
    resume: Annotated[
        Path | None, Opt(help="Finish the comparison in DIR: reuse finished runs, redo the rest.")
    ] = None,
    table_only: Annotated[
        bool,
        Opt("--table-only", help="With --resume DIR: rebuild the table from the finished runs, run nothing."),
    ] = False,
) -> None:
    """Compare strategies × seeds against one teacher at equal compute: a table with error bars and paired tests."""
    options = dict(locals())
    if jobs < 1:
        raise KdError(f"--jobs {jobs} must be at least 1")
    data = _resume_comparison(resume, options) if resume is not None else _new_comparison(options)
    text = (Path(data["output_dir"]) / "comparison.md").read_text()
    out.print(text, highlight=False, markup=False, soft_wrap=True)
    _exit_if_an_arm_has_no_run(data)


def _exit_if_an_arm_has_no_run(data: dict[str, Any]) -> None:
    """After the table: exit 1 with one line when an arm has no finished run (its numbers are all missing)."""
    unfinished = [row for row in data["arms"] if row["n_ok"] == 0]
    if not unfinished:
        return
    first = unfinished[0]
    names = ", ".join(f"'{row['name']}'" for row in unfinished)
    which = f"arm {names} has" if len(unfinished) == 1 else f"arms {names} have"
    runs_dir = Path(data["output_dir"]) / "runs" / first["name"]
    reason = f" ({first['error']})" if first.get("error") else ""
    err.print(
        f"[bold red]error:[/bold red] {escape(which)} no finished run{escape(reason)}; see the logs in "
        f"{escape(str(runs_dir))}/, then finish with kd compare --resume {escape(data['output_dir'])}",
        highlight=False,
    )
    raise typer.Exit(1)


#: kd compare's options that set the base run config every arm shares, as kd run's do.
COMPARE_BASE_OPTIONS = (
    "teacher",
    "student",
    "tokenizer",
    "teacher_steps",
    "dataset",
    "eval_dataset",
    "seq_len",
    "train_share",
    "max_steps",
    "batch_size",
    "lr",
)


def _resume_comparison(resume: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``kd compare --resume DIR [--table-only]``: every setting comes from DIR/compare.yaml."""
    from kdcore import compare as cmp

    given = [n for n, v in options.items() if n not in ("resume", "jobs", "table_only") and v is not None]
    if given:
        raise KdError(
            f"--resume takes every setting from {resume}/compare.yaml; drop --{given[0].replace('_', '-')} "
            "(only --jobs may be given)"
        )
    offline_hint()
    if options["table_only"]:
        return cmp.table_only(resume, log=log)
    return cmp.resume(resume, jobs=options["jobs"], log=log, console=err)


def _new_comparison(options: dict[str, Any]) -> dict[str, Any]:
    from kdcore import compare as cmp

    if options["table_only"]:
        raise KdError("--table-only rebuilds an existing comparison's table; give it with --resume DIR")
    overrides: dict[str, Any] = {
        RUN_OPTIONS[name]: options[name] for name in COMPARE_BASE_OPTIONS if options[name] is not None
    }
    with_sets(overrides, given_flags(options, COMPARE_BASE_OPTIONS), options["set_"])
    plan = cmp.build_plan(
        config=options["config"],
        arm_texts=options["arm"] or [],
        preset=options["preset"],
        overrides=overrides,
        seeds=options["seeds"],
        teacher_seed=options["teacher_seed"],
        sweep=options["sweep"],
        matched=options["matched"],
        teacher_cache=options["teacher_cache"],
        teacher_cache_k=options["teacher_cache_k"],
        equal_time=options["equal_time"],
        command="kd compare " + " ".join(sys.argv[2:]),
    )
    out_dir = options["output_dir"] or cmp.default_output_dir()
    for note in plan.notes:
        log(f"note: {note}")
    offline_hint()
    return cmp.compare(plan, out_dir, jobs=options["jobs"], log=log, console=err)
