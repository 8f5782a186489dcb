"""The ``kd`` command line. Start-up stays fast: torch and transformers load only inside commands."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from kdcore import __version__
from kdcore.config import parse_assignment, resolve_config
from kdcore.errors import KdError
from kdcore.scaffold import KIND_CHOICES
from kdcore.strategies import KINDS

app = typer.Typer(
    name="kd",
    help="Knowledge distillation for language models with curriculum learning and selective reliance.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, soft_wrap=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn a :class:`KdError` into one red sentence and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KdError as exc:
            err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"kdcore {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """kd: distil a student language model from a teacher, with pluggable strategies."""


# Each run option maps to one dotted config field; the CLI only overrides what was given.
RUN_OPTIONS: dict[str, str] = {
    "teacher": "model.teacher",
    "student": "model.student",
    "tokenizer": "model.tokenizer",
    "teacher_steps": "model.teacher_steps",
    "teacher_cache": "model.teacher_cache",
    "trust_remote_code": "model.trust_remote_code",
    "dataset": "data.dataset",
    "eval_dataset": "data.eval_dataset",
    "text_column": "data.text_column",
    "seq_len": "data.seq_len",
    "train_share": "data.train_share",
    "scorer": "strategy.scorer.name",
    "pacing": "strategy.pacing.name",
    "reliance": "strategy.reliance.name",
    "divergence": "strategy.divergence.name",
    "source": "strategy.source.name",
    "temperature": "strategy.temperature",
    "reverse": "strategy.reverse",
    "max_steps": "training.max_steps",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "grad_accum": "training.grad_accum",
    "lr": "training.lr",
    "seed": "training.seed",
    "eval_every": "training.eval_every",
    "mixed_precision": "training.mixed_precision",
    "threads": "training.threads",
    "checkpoint_every": "training.checkpoint_every",
    "teacher_placement": "training.teacher_placement",
    "output_dir": "output.dir",
    "report_to": "output.report_to",
    "push_to_hub": "output.push_to_hub",
    "baseline": "output.baseline",
}

Opt = typer.Option
TRAIN_SHARE_HELP = (
    "Train the student on the first share (0 < P ≤ 1) of the training text, by characters, after the eval "
    "split; the eval set and a from-scratch teacher's data stay whole (default 1; the demo corpus 0.02)."
)
STRAT = "Strategies"
MODEL = "Models and data"
TRAIN = "Training"
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


@app.command(cls=RunCommand)
@friendly_errors
def run(
    config: Annotated[
        Path | None, Opt("--config", "-c", help="YAML or JSON run config; flags override it.")
    ] = None,
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
        Opt(help="For a from-scratch teacher: 'byte' or 'bpe:vocab_size=N'.", rich_help_panel=MODEL),
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
    seq_len: Annotated[int | None, Opt(help="Tokens per packed sample.", rich_help_panel=MODEL)] = None,
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
        list[str] | None, Opt("--set", help="Any config field, e.g. --set training.warmup_ratio=0.1.")
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

    _warn_broken_plugins()
    instantiate_strategies(cfg.strategy)  # unknown names and bad parameters fail here, in a second
    if print_config:
        out.print(cfg.to_yaml(), highlight=False, end="")
        return
    if dry_run:
        from kdcore.runs.dry_run import dry_run as check_run

        check_run(cfg, console=out)
        return
    _offline_hint()
    _launch(cfg)


def _run_config(options: dict[str, Any]) -> Any:
    """The run config ``kd run``'s options describe: --config, then each option given, then --set."""
    overrides: dict[str, Any] = {
        RUN_OPTIONS[name]: value
        for name, value in options.items()
        if name in RUN_OPTIONS and value is not None
    }
    for kind in KINDS:  # --scorer-arg k=v, --pacing-arg k=v, ...
        for pair in options.get(f"{kind}_arg") or []:
            key, value = parse_assignment(pair)
            overrides[f"strategy.{kind}.params.{key}"] = value
    lambda_ = options["lambda_"]
    if lambda_ is not None:
        overrides["strategy.reliance.params.value"] = lambda_
    for pair in options["set_"] or []:
        key, value = parse_assignment(pair)
        overrides[key] = value
    cfg = resolve_config(options["config"], overrides)
    if lambda_ is not None and cfg.strategy.reliance.name != "fixed":
        raise KdError(
            f"--lambda sets the fixed policy's λ; reliance '{cfg.strategy.reliance.name}' takes its own "
            "parameters, e.g. --reliance-arg lambda_hard=0.9 (see docs/strategies.md)"
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

    _warn_broken_plugins()
    cfg = resume_config(run_dir)
    _offline_hint()
    _launch(cfg, resume=True)


def _warn_broken_plugins() -> None:
    """One line when an installed plugin failed to load: its strategies are missing from this run's choices."""
    from kdcore.plugins import get_registry

    broken = [e for e in get_registry().entries if e.status == "broken"]
    if len(broken) == 1:
        line = f"warning: {broken[0].error}; kd list-plugins shows it"
    elif broken:
        names = ", ".join(f"'{e.name}' ({e.distribution})" for e in broken)
        line = f"warning: {len(broken)} installed plugins failed to load: {names}; kd list-plugins shows why"
    else:
        return
    err.print(line, style="yellow", highlight=False, markup=False)


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


@app.command("train-teacher")
@friendly_errors
def train_teacher(
    model: Annotated[
        str,
        Opt(help="Spec like gpt2:n_layer=4,n_embd=128,n_head=4, a local directory, a hub id or a GGUF file."),
    ],
    output_dir: Annotated[Path, Opt(help="Where to save_pretrained the model and tokenizer.")],
    dataset: Annotated[str, Opt(help="Training data, as for kd run.")] = "demo",
    eval_dataset: Annotated[str | None, Opt(help="Evaluation data.")] = None,
    text_column: Annotated[str, Opt(help="Text column of tabular data.")] = "text",
    tokenizer: Annotated[
        str | None, Opt(help="'byte' or 'bpe:vocab_size=N' for a from-scratch model.")
    ] = None,
    seq_len: Annotated[int, Opt(help="Tokens per packed sample.")] = 128,
    max_steps: Annotated[int, Opt(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, Opt(help="Samples per step.")] = 16,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = 3e-3,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
) -> None:
    """Train a causal LM with plain cross-entropy and save it, ready for --teacher DIR."""
    from kdcore.files import check_output_dir

    check_output_dir(output_dir, "--output-dir")
    if (output_dir / "config.json").exists():
        raise KdError(f"'{output_dir}' already holds a model; choose another --output-dir")
    cfg = resolve_config(
        None,
        {
            "data.dataset": dataset,
            "data.eval_dataset": eval_dataset,
            "data.text_column": text_column,
            "data.seq_len": seq_len,
            "training.max_steps": max_steps,
            "training.batch_size": batch_size,
            "training.lr": lr,
            "training.seed": seed,
        },
    )
    _offline_hint()
    from kdcore.teachers.train import train_teacher

    train_teacher(model, tokenizer, cfg, output_dir, err)


@app.command("cache-teacher")
@friendly_errors
def cache_teacher(
    output: Annotated[Path, Opt(help="Directory to write the cache to (must not exist or be empty).")],
    config: Annotated[
        Path | None, Opt("--config", "-c", help="The run's YAML or JSON config; flags override it.")
    ] = None,
    teacher: Annotated[
        str | None, Opt(help="Hub id, local directory, GGUF file, or from-scratch spec.")
    ] = None,
    dataset: Annotated[str | None, Opt(help="Training data, as for kd run.")] = None,
    tokenizer: Annotated[
        str | None, Opt(help="For a from-scratch teacher: 'byte' or 'bpe:vocab_size=N'.")
    ] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per packed sample.")] = None,
    top_k: Annotated[int, Opt(help="Tokens kept per position (the vocabulary size keeps them all).")] = 64,
    dtype: Annotated[str, Opt(help="Log-probability storage: float32 or float16.")] = "float32",
    batch_size: Annotated[int, Opt(help="Samples per teacher forward pass.")] = 32,
    set_: Annotated[
        list[str] | None, Opt("--set", help="Any config field, e.g. --set data.demo_samples=500.")
    ] = None,
) -> None:
    """Run the teacher once over the training set and store its top-K log-probabilities for kd run --teacher-cache."""
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("model.teacher", teacher),
            ("data.dataset", dataset),
            ("model.tokenizer", tokenizer),
            ("data.seq_len", seq_len),
        )
        if value is not None
    }
    for pair in set_ or []:
        key, value = parse_assignment(pair)
        overrides[key] = value
    cfg = resolve_config(config, overrides)
    _offline_hint()
    from kdcore.teachers.cache import build_cache

    build_cache(cfg, output, top_k=top_k, dtype=dtype, batch_size=batch_size, console=err)


@app.command("list-plugins")
@friendly_errors
def list_plugins(
    as_json: Annotated[bool, Opt("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List every installed strategy: kind, name, description, providing package, status."""
    from kdcore.plugins import get_registry

    entries = get_registry().entries
    if as_json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return
    table = Table(title="kdcore plugins")
    for column in ("kind", "name", "description", "distribution", "status"):
        table.add_column(column, overflow="fold")
    order = {kind: i for i, kind in enumerate(KINDS)}  # the plugins that failed to load come last
    for e in sorted(entries, key=lambda e: (order.get(e.kind, len(order)), e.name)):
        status = "[green]ok[/green]" if e.status == "ok" else f"[red]{e.status}[/red]: {e.error}"
        table.add_row(e.kind, e.name, e.description, f"{e.distribution} {e.version}", status)
    out.print(table)


@app.command("new-plugin")
@friendly_errors
def new_plugin(
    name: Annotated[str, typer.Argument(help="Strategy name: lower-case letters, digits, dashes.")],
    kind: Annotated[str, Opt(help=f"{', '.join(KIND_CHOICES[:-1])} or {KIND_CHOICES[-1]}.")] = "scorer",
    output_dir: Annotated[Path, Opt(help="Where to write kd-plugin-NAME/.")] = Path("."),
) -> None:
    """Write an installable plugin package kd-plugin-NAME with a working strategy, tests and README."""
    from kdcore.scaffold import write_plugin

    target = write_plugin(name, kind, output_dir)
    steps = [
        f"pip install -e {target}",
        "kd list-plugins",
        f"python -m pytest {target}",
        f"kd run --{kind} {name}",
    ]
    out.print(f"wrote {target}\nnext:\n  " + "\n  ".join(steps), highlight=False, soft_wrap=True)


@app.command("report")
@friendly_errors
def report(
    directory: Annotated[
        Path, typer.Argument(help="A run directory (kd run) or a comparison directory (kd compare).")
    ],
    output: Annotated[
        Path | None, Opt("--output", "-o", help="Where to write the page (default DIR/report.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML page (plots, tables, config) for a run or a comparison, readable offline."""
    from kdcore.reports import build_report

    out.print(f"wrote {build_report(directory, output)}", highlight=False, soft_wrap=True)


@app.command("compare")
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
        Path | None, Opt("--config", "-c", help="YAML: a base run config plus arms:, seeds:, teacher_seed:.")
    ] = None,
    teacher: Annotated[str | None, Opt(help="Teacher: directory, hub id or spec (trained once).")] = None,
    student: Annotated[str | None, Opt(help="Student: hub id, directory or from-scratch spec.")] = None,
    tokenizer: Annotated[str | None, Opt(help="For a spec teacher: 'byte' or 'bpe:vocab_size=N'.")] = None,
    teacher_steps: Annotated[int | None, Opt(help="Training steps of a spec teacher.")] = None,
    dataset: Annotated[str | None, Opt(help="Training data, as for kd run.")] = None,
    eval_dataset: Annotated[str | None, Opt(help="Evaluation data (default: held-out tail).")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per packed sample.")] = None,
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
        list[str] | None, Opt("--set", help="Any base config field, e.g. --set data.max_eval_samples=64.")
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


def _log(line: str) -> None:
    err.print(line, highlight=False, markup=False)


def _resume_comparison(resume: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``kd compare --resume DIR [--table-only]``: every setting comes from DIR/compare.yaml."""
    from kdcore import compare as cmp

    given = [n for n, v in options.items() if n not in ("resume", "jobs", "table_only") and v is not None]
    if given:
        raise KdError(
            f"--resume takes every setting from {resume}/compare.yaml; drop --{given[0].replace('_', '-')} "
            "(only --jobs may be given)"
        )
    _offline_hint()
    if options["table_only"]:
        return cmp.table_only(resume, log=_log)
    return cmp.resume(resume, jobs=options["jobs"], log=_log, console=err)


def _new_comparison(options: dict[str, Any]) -> dict[str, Any]:
    from kdcore import compare as cmp

    if options["table_only"]:
        raise KdError("--table-only rebuilds an existing comparison's table; give it with --resume DIR")
    overrides: dict[str, Any] = {
        RUN_OPTIONS[name]: options[name] for name in COMPARE_BASE_OPTIONS if options[name] is not None
    }
    for pair in options["set_"] or []:
        key, value = parse_assignment(pair)
        overrides[key] = value
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
        _log(f"note: {note}")
    _offline_hint()
    return cmp.compare(plan, out_dir, jobs=options["jobs"], log=_log, console=err)


def _offline_hint() -> None:
    """Nothing to do when online; keeps a place for environment checks that must not import torch."""


def main() -> None:
    app(prog_name="kd")  # also under python -m kdcore: usage lines and completion scripts name `kd`


if __name__ == "__main__":
    sys.exit(main())
