"""kd run: one distillation run, its --resume, --print-config and --dry-run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from kdcore.cli.common import err, friendly_errors, offline_hint, out, warn_broken_plugins
from kdcore.cli.options import (
    MODEL,
    RUN_OPTIONS,
    SEQ_LEN_HELP,
    SPEC_TOKENIZER_HELP,
    STRAT,
    TRAIN,
    TRAIN_SHARE_HELP,
    Opt,
    config_file,
    given_flags,
    set_fields,
    with_sets,
)
from kdcore.config import parse_assignment, resolve_config
from kdcore.errors import KdError
from kdcore.strategies import KINDS

SOURCE_HELP = "Where rows come from: {names} (dataset is the default; kd list-plugins describes each)."


class RunCommand(TyperCommand):
    """``kd run``: its --help names every installed source, plugins' too (read when help is shown, so that
    other commands do not load the plugins for it)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from kdcore.plugins import get_registry

        names = get_registry().names("source")
        for param in self.params:
            if param.name == "source":
                param.help = SOURCE_HELP.format(names=", ".join(names))
        super().format_help(ctx, formatter)


@friendly_errors
def run(
    config: Annotated[Path | None, config_file("YAML or JSON run config; flags override it.")] = None,
    teacher: Annotated[
        str | None,
        Opt(
            help="Hub id, local directory, GGUF file (model.gguf, org/repo:model.gguf), or spec like "
            "gpt2:n_layer=4,n_embd=128.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    student: Annotated[
        str | None,
        Opt(
            help="Hub id, local directory, GGUF file, from-scratch spec, or a cut of the teacher such as "
            "from-teacher:num_layers=4 (or layers=0,10,20,29 or every=3).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        Opt(help=SPEC_TOKENIZER_HELP, rich_help_panel=MODEL),
    ] = None,
    teacher_steps: Annotated[
        int | None,
        Opt(help="Training steps for a from-scratch teacher (trained once, cached).", rich_help_panel=MODEL),
    ] = None,
    teacher_cache: Annotated[
        Path | None,
        Opt(
            help="Train from a 'kd cache-teacher' directory; no teacher model is loaded.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool | None, Opt("--trust-remote-code", help="Allow model code from the hub.", rich_help_panel=MODEL)
    ] = None,
    dataset: Annotated[
        str | None,
        Opt(
            help="'demo', a .txt/.jsonl/.csv/.parquet file or folder, or hub name:config:split.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    eval_dataset: Annotated[
        str | None,
        Opt(help="Evaluation data (default: hold out the end of the training data).", rich_help_panel=MODEL),
    ] = None,
    text_column: Annotated[
        str | None, Opt(help="Text column of tabular data.", rich_help_panel=MODEL)
    ] = None,
    seq_len: Annotated[int | None, Opt(help=SEQ_LEN_HELP, rich_help_panel=MODEL)] = None,
    train_share: Annotated[float | None, Opt(help=TRAIN_SHARE_HELP, rich_help_panel=MODEL)] = None,
    scorer: Annotated[
        str | None, Opt(help="Difficulty scorer (see kd list-plugins).", rich_help_panel=STRAT)
    ] = None,
    pacing: Annotated[str | None, Opt(help="Pacing function.", rich_help_panel=STRAT)] = None,
    reliance: Annotated[
        str | None,
        Opt(help="Reliance policy: fixed is vanilla KD, none is the CE baseline.", rich_help_panel=STRAT),
    ] = None,
    divergence: Annotated[
        str | None, Opt(help="Divergence between teacher and student distributions.", rich_help_panel=STRAT)
    ] = None,
    source: Annotated[
        str | None,
        Opt(
            help=SOURCE_HELP.format(names="dataset, on-policy, mixed, teacher-generated or a plugin's"),
            rich_help_panel=STRAT,
        ),
    ] = None,
    scorer_arg: Annotated[
        list[str] | None, Opt(help="Scorer parameter key=value (repeatable).", rich_help_panel=STRAT)
    ] = None,
    pacing_arg: Annotated[
        list[str] | None, Opt(help="Pacing parameter key=value (repeatable).", rich_help_panel=STRAT)
    ] = None,
    reliance_arg: Annotated[
        list[str] | None, Opt(help="Reliance parameter key=value (repeatable).", rich_help_panel=STRAT)
    ] = None,
    divergence_arg: Annotated[
        list[str] | None, Opt(help="Divergence parameter key=value (repeatable).", rich_help_panel=STRAT)
    ] = None,
    source_arg: Annotated[
        list[str] | None,
        Opt(help="Source parameter key=value, e.g. max_new_tokens=32 (repeatable).", rich_help_panel=STRAT),
    ] = None,
    lambda_: Annotated[
        float | None, Opt("--lambda", help="λ of the fixed policy (vanilla KD).", rich_help_panel=STRAT)
    ] = None,
    temperature: Annotated[
        float | None, Opt(help="Distillation temperature τ.", rich_help_panel=STRAT)
    ] = None,
    reverse: Annotated[
        bool | None,
        Opt("--reverse/--no-reverse", help="Hard-to-easy ordering (anti-curriculum).", rich_help_panel=STRAT),
    ] = None,
    max_steps: Annotated[int | None, Opt(help="Optimizer steps.", rich_help_panel=TRAIN)] = None,
    epochs: Annotated[
        float | None, Opt(help="Epochs (used when max-steps is unset).", rich_help_panel=TRAIN)
    ] = None,
    batch_size: Annotated[int | None, Opt(help="Samples per optimizer step.", rich_help_panel=TRAIN)] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per step.", rich_help_panel=TRAIN)] = None,
    lr: Annotated[
        float | None, Opt(help="Peak learning rate (AdamW, warm-up + cosine).", rich_help_panel=TRAIN)
    ] = None,
    seed: Annotated[int | None, Opt(help="Random seed.", rich_help_panel=TRAIN)] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between evaluations.", rich_help_panel=TRAIN)] = None,
    mixed_precision: Annotated[str | None, Opt(help="no, fp16 or bf16.", rich_help_panel=TRAIN)] = None,
    threads: Annotated[int | None, Opt(help="Torch CPU threads.", rich_help_panel=TRAIN)] = None,
    checkpoint_every: Annotated[
        int | None,
        Opt(help="Steps between checkpoints in RUN_DIR/checkpoints (default 100).", rich_help_panel=TRAIN),
    ] = None,
    teacher_placement: Annotated[
        str | None,
        Opt(
            help="replicated: the whole teacher on every process; sharded: split over the processes "
            "with FSDP2 (launch with an FSDP accelerate config, see docs/scaling.md).",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    output_dir: Annotated[
        Path | None, Opt(help="Run directory (default runs/<timestamp>-<strategy>).")
    ] = None,
    resume: Annotated[
        Path | None,
        Opt(
            help="Continue the run in this directory from its newest valid checkpoint, with its own "
            "config.yaml; no other option may be given.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, set_fields("Any config field, e.g. --set training.warmup_ratio=0.1.")
    ] = None,
    print_config: Annotated[
        bool, Opt("--print-config", help="Print the resolved config as YAML and exit.")
    ] = False,
    report_to: Annotated[
        str | None, Opt(help="Experiment tracker: tensorboard, wandb, mlflow, all or none.")
    ] = None,
    push_to_hub: Annotated[
        str | None, Opt(help="After the run, upload the student and its model card to this hub repo.")
    ] = None,
    baseline: Annotated[
        bool | None,
        Opt(
            "--baseline/--no-baseline",
            help="Also train the CE-only student (same data, steps and seed, no teacher) in RUN_DIR/baseline "
            "and show the share of the CE→teacher gap closed.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        Opt(
            "--dry-run",
            help="Check config, plugins, data and models, estimate memory and steps; train nothing.",
        ),
    ] = False,
) -> None:
    """Distil a student from a teacher. With no arguments: the demo corpus, a small cached teacher, vanilla KD."""
    options = dict(locals())
    if resume is not None:
        return _resume(resume, {name: value for name, value in options.items() if name != "resume"})
    cfg = _run_config(options)
    from kdcore.plugins import instantiate_strategies

    warn_broken_plugins()
    instantiate_strategies(cfg.strategy)  # unknown names and bad parameters fail here, in a second
    if print_config:
        out.print(cfg.to_yaml(), highlight=False, end="")
        return
    if dry_run:
        from kdcore.runs.dry_run import dry_run as check_run

        check_run(cfg, console=out)
        return
    offline_hint()
    _launch(cfg)


def _own_parameters(kind: str, name: str) -> str:
    """How to pass a strategy's own parameters, naming only those it accepts (a λ one first).

    Only kd run's --lambda asks this, so the advice without parameters names --lambda."""
    from kdcore.plugins import get_registry

    cls = get_registry().entry(kind, name).cls
    fields = list(cls.Params.model_fields) if cls is not None else []
    flag = f"--{kind}-arg"
    if not fields:
        return f"takes no parameters; drop --lambda, or use --{kind} fixed"
    first = next((f for f in fields if f.startswith("lambda")), fields[0])
    return f"takes its own parameters, e.g. {flag} {first}=... (it accepts {', '.join(fields)})"


def _check_names(options: dict[str, Any]) -> None:
    """``--reliance 'threshold(invert=true)'`` is compare's arm grammar; kd run takes parameters apart."""
    for kind in KINDS:
        given = options.get(kind)
        if given and "(" in given:
            name, _, params = given.partition("(")
            pairs = " ".join(f"--{kind}-arg {p.strip()}" for p in params.rstrip(")").split(",") if p.strip())
            raise KdError(
                f"--{kind} takes a name alone, not '{given}'; pass its parameters with --{kind}-arg, e.g. "
                f"--{kind} {name.strip()} {pairs}".rstrip()
            )


def _run_config(options: dict[str, Any]) -> Any:
    """The run config ``kd run``'s options describe: --config, then each option given, then --set."""
    _check_names(options)
    flags = given_flags(options, RUN_OPTIONS)
    overrides: dict[str, Any] = {
        RUN_OPTIONS[name]: value
        for name, value in options.items()
        if name in RUN_OPTIONS and value is not None
    }
    for kind in KINDS:  # --scorer-arg k=v, --pacing-arg k=v, ...
        for pair in options.get(f"{kind}_arg") or []:
            key, value = parse_assignment(pair)
            overrides[f"strategy.{kind}.params.{key}"] = value
            flags[f"strategy.{kind}.params.{key}"] = f"--{kind}-arg {pair}"
    lambda_ = options["lambda_"]
    if lambda_ is not None:
        overrides["strategy.reliance.params.value"] = lambda_
        flags["strategy.reliance.params.value"] = f"--lambda {lambda_}"
    with_sets(overrides, flags, options["set_"])
    cfg = resolve_config(options["config"], overrides)
    if lambda_ is not None and cfg.strategy.reliance.name != "fixed":
        raise KdError(
            f"--lambda sets the fixed policy's λ; reliance '{cfg.strategy.reliance.name}' "
            f"{_own_parameters('reliance', cfg.strategy.reliance.name)}"
        )
    return cfg


def _resume(run_dir: Path, options: dict[str, Any]) -> None:
    """``kd run --resume DIR``: the run's own config.yaml and nothing else, so the result cannot drift."""
    extra = [
        f"--{name.rstrip('_').replace('_', '-')}"
        for name, value in options.items()
        if value is not None and value is not False and value != []
    ]
    if extra:
        raise KdError(
            f"--resume continues the run exactly as {run_dir / 'config.yaml'} describes; drop "
            f"{', '.join(extra)} (see docs/resume.md)"
        )
    from kdcore.training.checkpoint import resume_config

    warn_broken_plugins()
    cfg = resume_config(run_dir)
    offline_hint()
    _launch(cfg, resume=True)


def _launch(cfg: Any, resume: bool = False) -> None:
    """Run; SIGINT/SIGTERM end it after a checkpoint with exit code 130/143 and the resume command."""
    from kdcore.errors import RunInterrupted
    from kdcore.runs.runner import run as run_distillation

    try:
        run_distillation(cfg, console=err, resume=resume, exits_after_stop=True)
    except RunInterrupted as exc:
        if exc.main_process:
            err.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(exc.exit_code) from None
