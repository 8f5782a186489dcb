"""One distillation run, from a :class:`RunConfig` to a run directory.

Order matters for users: strategies are resolved first (an unknown plugin fails in a second, before
any model loads), then data, teacher, student and their vocabularies are checked, and only then
does training start. ``summary.json`` is written last, atomically: its presence means the run
finished.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from accelerate import PartialState
from rich.console import Console

from kdcore.config import RunConfig
from kdcore.errors import KdError, RunInterrupted
from kdcore.files import atomic_directory, atomic_write_text, check_output_dir
from kdcore.inputs.corpus import load_corpus
from kdcore.inputs.cut import calibrate_head, cut_student, parse_cut_spec
from kdcore.inputs.models import (
    build_from_spec,
    check_seq_len,
    check_sources,
    check_student_tokenizer,
    check_vocab_sizes,
    load_pretrained,
    model_config,
    parse_spec,
    quiet_transformers,
    remote_code_warning,
    vocab_size,
)
from kdcore.inputs.tokenization import pad_id
from kdcore.references import gap_closed
from kdcore.runs.baseline import baseline_config
from kdcore.runs.model_card import check_push, push_to_hub, render_model_card, write_model_card
from kdcore.runs.outputs import MetricsWriter, print_summary, write_history, write_plots
from kdcore.runs.trackers import Tracking, resolve_trackers
from kdcore.summary import SUMMARY_FILE, RunSummary
from kdcore.teachers.resolve import resolve_teacher
from kdcore.training import parallel
from kdcore.training.checkpoint import (
    Checkpointer,
    check_plugins,
    check_resumable,
    find_checkpoint,
    truncate_metrics,
)
from kdcore.training.engine import Strategies, Trainer, make_strategies
from kdcore.training.progress import TrainingProgress
from kdcore.training.setup import total_steps
from kdcore.training.sources import check_source, eos_ids_of

if TYPE_CHECKING:
    from kdcore.inputs.corpus import Corpus
    from kdcore.inputs.packing import PackedDataset
    from kdcore.teachers.cache import TeacherCache


@dataclass
class RunResult:
    """What :func:`run` returns: the run's summary (``summary.json``) and its directory."""

    summary: RunSummary
    run_dir: Path


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.strategy.label()}"


#: What a run that failed before its first step leaves (it is written just before training starts).
FAILED_START = {"config.yaml", "strategies.yaml"}


def check_run_dir(path: Path) -> Path:
    """Refuse a directory that holds another run; it is created only once inputs are checked.

    A directory holding only a failed start (:data:`FAILED_START`) is reused: nothing in it is lost.
    """
    check_output_dir(path, "--output-dir")
    if (path / SUMMARY_FILE).exists():
        raise KdError(f"'{path}' already holds a finished run; choose another --output-dir")
    if path.exists() and not {p.name for p in path.iterdir()} <= FAILED_START:
        raise KdError(f"output directory '{path}' is not empty; choose another --output-dir or remove it")
    return path


def open_run_dir(cfg: RunConfig, resume: bool, console: Console) -> tuple[Path, dict[str, Any] | None]:
    """The run directory, the same on every process, and on resume the checkpoint to continue from.

    Every process checks the directory before the main one writes to it (accelerate launch/torchrun).
    """
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())
    parallel.check_backend(state.distributed_type)  # an FSDP config on CPU fails before anything is written
    found = None
    if resume:
        run_dir = Path(cfg.output.dir)
        check_resumable(run_dir)
        found = find_checkpoint(
            run_dir,
            cfg.to_dict(),
            parallel.backend(state.num_processes),
            lambda msg: console.print(f"[yellow]{msg}[/yellow]") if state.is_main_process else None,
        )
        if state.is_main_process:
            console.print(f"Resuming {run_dir} from {resume_point(cfg, run_dir, found)}")
    else:
        run_dir = check_run_dir(cfg.output.dir or default_run_dir(cfg))
    if state.num_processes > 1:  # the default directory is named by the clock: take the main process's
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    state.wait_for_everyone()
    return run_dir, None if found is None else {"path": found[0], **found[1]}


def resume_point(cfg: RunConfig, run_dir: Path, found: tuple[Path, dict[str, Any]] | None) -> str:
    """Where a resumed run goes on: its checkpoint, else its unfinished CE-only baseline, else step 0."""
    if found:
        return f"{found[0]} (step {found[1]['step']})"
    base_cfg = baseline_config(cfg, run_dir) if cfg.output.baseline else None
    if base_cfg is not None and base_cfg.output.dir is not None:
        base_dir = Path(base_cfg.output.dir)
        if (base_dir / "config.yaml").is_file() and RunSummary.read(base_dir) is None:
            return (
                "inside its CE-only baseline, which had not finished (the run itself then starts at step 0)"
            )
    return "step 0 (no checkpoint yet)"


def interrupted(trainer: Trainer, run_dir: Path, main: bool) -> RunInterrupted:
    """A Ctrl-C outside the training loop's own handling (a second one, or one after the loop: the last
    evaluation, the student gathered or written): the run resumes from its newest checkpoint."""
    last = trainer.checkpoints.last_step if trainer.checkpoints is not None else None
    return RunInterrupted(trainer.step, signal.SIGINT, run_dir, main, resume_step=last or 0)


# -- teacher and student ---------------------------------------------------------------------------
def load_teacher(cfg: RunConfig, corpus: Corpus, console: Console) -> tuple[Any, Any]:
    """The teacher model and its tokenizer (a spec teacher is trained, a GGUF file converted, once)."""
    source, tokenizer = resolve_teacher(cfg.model, corpus, cfg.data.seq_len, cfg.training, console)
    return load_pretrained(source, trust_remote_code=cfg.model.trust_remote_code), tokenizer


def resolve_student(
    cfg: RunConfig, tokenizer: Any, teacher: Any | None, corpus: Corpus, console: Console
) -> Any:
    """The student: a spec built from scratch, a pretrained model, or a cut of the teacher (whose weights
    are loaded for it when a teacher cache stands in for the teacher, then freed)."""
    model = cfg.model
    cut = parse_cut_spec(model.student)
    if cut is not None:  # same tokenizer as the teacher by construction
        source = teacher if teacher is not None else load_teacher(cfg, corpus, console)[0]
        total = source.config.num_hidden_layers
        layers = cut.select(total)
        student = cut_student(source, cut)  # a teacher it cannot cut is refused before any success is said
        console.print(
            f"Student cut from the teacher: {len(layers)} of its {total} layers ({', '.join(map(str, layers))})",
            highlight=False,
        )
        return student
    spec = parse_spec(model.student)
    if spec is not None:
        return build_from_spec(spec, tokenizer, cfg.training.seed)
    echo = functools.partial(console.print, highlight=False)
    student = load_pretrained(model.student, trust_remote_code=model.trust_remote_code, echo=echo)
    check_student_tokenizer(tokenizer, model)
    return student


def calibrate_cut(cfg: RunConfig, student: Any, train: PackedDataset, console: Console) -> None:
    """A cut student's head, made no more confident than the training text supports
    (:func:`~kdcore.inputs.cut.calibrate_head`); anything else is left as built."""
    if parse_cut_spec(cfg.model.student) is None:
        return
    scale = calibrate_head(student, train.input_ids, train.attention_mask, train.labels)
    if scale != 1.0:
        console.print(
            f"Its final norm scaled by {scale:.3g}: the copied head was more confident than the first training "
            "samples support (docs/real-models.md)",
            highlight=False,
        )


def check_vocabularies(
    teacher: Any, student: Any, tokenizer: Any, names: tuple[str, str], console: Console
) -> None:
    vt = teacher if isinstance(teacher, int) else vocab_size(teacher)  # an int: a teacher cache's vocabulary
    note = check_vocab_sizes(len(tokenizer), vt, vocab_size(student), *names)
    if note:
        console.print(f"[yellow]{note}[/yellow]")


# -- the run ---------------------------------------------------------------------------------------
def run(
    cfg: RunConfig,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    resume: bool = False,
    exits_after_stop: bool = False,
) -> RunResult:
    """Run ``cfg``; ``resume``: continue the run in ``cfg.output.dir`` from its newest valid checkpoint.

    ``exits_after_stop``: the caller exits when SIGINT/SIGTERM stop the run (the CLI does), so
    later signals are ignored during its shutdown.
    """
    console = console or Console(stderr=True)
    quiet_transformers()
    wall_start = time.perf_counter()
    strategies, strategy_meta = check_early(cfg, resume, console)
    run_dir, checkpoint = open_run_dir(cfg, resume, console)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.training.seed)
    models = load_models(cfg, console)

    main = PartialState().is_main_process  # with several processes, only the main one writes files
    if main and not resume and cfg.output.baseline:  # the baseline trains first, inside the run directory,
        run_dir.mkdir(parents=True, exist_ok=True)  # and a stop there resumes from the run's config
        write_run_files(run_dir, cfg, strategy_meta)
    baseline = None
    teacher_ppl = None  # measured by the first training: the baseline's, else the run's
    if cfg.output.baseline:
        baseline = run_baseline(cfg, run_dir, models, console, show_progress, resume, exits_after_stop)
        teacher_ppl = None if baseline is None else baseline.teacher_eval_ppl
    trained = train(
        cfg,
        run_dir,
        models,
        (strategies, strategy_meta),
        checkpoint,
        teacher_ppl,
        console,
        show_progress,
        resume=resume,
        exits_after_stop=exits_after_stop,
    )
    if not main:  # the main process writes the student, plots and summary
        return RunResult(trained.result, run_dir)
    teacher_ppl = trained.teacher_ppl
    result = replace(trained.result, teacher_eval_ppl=teacher_ppl)
    if baseline is not None:
        result = replace(
            result,
            baseline_eval_ppl=baseline.student_eval_ppl,
            gap_closed=gap_closed(baseline.student_eval_ppl, result.student_eval_ppl, teacher_ppl),
        )
    try:
        summary = write_outputs(cfg, run_dir, trained, models, strategy_meta, result, wall_start)
    except KeyboardInterrupt:  # summary.json is written last: until then the run resumes
        raise interrupted(trained.trainer, run_dir, main) from None
    if show_progress:
        print_summary(console, summary, baseline)
    if cfg.output.push_to_hub:
        url = push_to_hub(run_dir / "student", cfg.output.push_to_hub)
        console.print(f"Pushed the student and its model card to {url}")
    return RunResult(summary, run_dir)


def write_run_files(run_dir: Path, cfg: RunConfig, strategy_meta: dict[str, Any]) -> None:
    """What a run directory holds from its start: the resolved config and the strategies' metadata."""
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_text(run_dir / "strategies.yaml", yaml.safe_dump(strategy_meta, sort_keys=False))


@dataclass
class Trained:
    """What :func:`train` leaves: the trainer, its numbers and metrics, the teacher's eval perplexity and the
    student's full weights (gathered by every process; None when the student is not saved)."""

    trainer: Trainer
    result: RunSummary
    metrics: MetricsWriter
    teacher_ppl: float
    student: tuple[Any, dict[str, Any]] | None


def train(
    cfg: RunConfig,
    run_dir: Path,
    models: Models,
    strategies: tuple[Strategies, dict[str, Any]],
    checkpoint: dict[str, Any] | None,
    teacher_ppl: float | None,
    console: Console,
    show_progress: bool,
    *,
    resume: bool,
    exits_after_stop: bool,
    label: str | None = None,
) -> Trained:
    """Train ``models.student`` into ``run_dir`` (from ``checkpoint`` when resuming), with the metrics file,
    trackers and progress bar; ``teacher_ppl`` None: the teacher is evaluated here."""
    main = PartialState().is_main_process
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    if main and resume:  # back to what metrics.jsonl held at the checkpoint
        metrics.records = truncate_metrics(metrics.path, checkpoint["metrics_bytes"] if checkpoint else 0)
    tracking = Tracking(cfg.output.report_to, run_dir, cfg.output.tracker_project)
    progress = TrainingProgress(
        console if show_progress and main else None,
        total_steps(cfg.training, len(models.train)),
        label or cfg.strategy.label(),
    )
    trainer = make_trainer(cfg, models, strategies[0], run_dir, metrics, tracking, progress)
    if main and trainer.prefetch_note:
        console.print(f"[yellow]{trainer.prefetch_note}[/yellow]", highlight=False)
    if main and not resume:  # only now that every check has passed: a failed start writes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(run_dir, cfg, strategies[1])
    if teacher_ppl is None:
        teacher_ppl = models.cache.teacher_eval_ppl if models.cache else trainer.evaluate(trainer.teacher)
    tracking.start(
        trainer.accelerator,
        cfg.to_dict(),
        resume_step=(checkpoint["step"] if checkpoint else 0) if resume else None,
        teacher_perplexity=teacher_ppl,
    )
    with progress:
        try:
            result = trainer.fit(
                resume=checkpoint["path"] if checkpoint else None, exits_after_stop=exits_after_stop
            )
            tracking.finish()
            # every process takes part in gathering the student's weights (FSDP); the main one writes outputs
            student = trainer.full_student() if cfg.output.save_student else None
        except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop: the run can still resume
            raise interrupted(trainer, run_dir, main) from None
    return Trained(trainer, result, metrics, teacher_ppl, student)


def run_baseline(
    cfg: RunConfig,
    run_dir: Path,
    models: Models,
    console: Console,
    show_progress: bool,
    resume: bool,
    exits_after_stop: bool,
) -> RunSummary | None:
    """``output.baseline``: the run's CE-only student, in ``RUN_DIR/baseline`` with its own summary: read back
    when it finished before, continued when a resumed run stopped inside it, else trained from scratch.

    It shares the run's data, tokenizer and teacher evaluation (the teacher does not run during its
    training); its student is built anew with the run's seed. None when the run is that student already.
    """
    base_cfg = baseline_config(cfg, run_dir)
    if base_cfg is None:
        console.print("[dim]--baseline: this run is the CE-only student already; no baseline to train[/dim]")
        return None
    base_dir = base_cfg.output.dir
    assert base_dir is not None
    finished = RunSummary.read(base_dir)
    if finished is not None:
        return finished
    wall_start = time.perf_counter()
    strategies, strategy_meta = make_strategies(base_cfg.strategy)
    state = PartialState()
    again = resume and (base_dir / "config.yaml").is_file()
    found = None
    if again:
        found = find_checkpoint(
            base_dir,
            base_cfg.to_dict(),
            parallel.backend(state.num_processes),
            lambda msg: console.print(f"[yellow]{msg}[/yellow]"),
        )
    elif state.is_main_process and base_dir.exists():
        shutil.rmtree(base_dir)  # left before its config was written: nothing to continue
    state.wait_for_everyone()
    if state.is_main_process:
        where = (
            f"continued from step {found[1]['step']}" if found else "same data, steps and seed, no teacher"
        )
        console.print(f"Baseline: the CE-only student ({where}) in {base_dir}")
    student = resolve_student(base_cfg, models.tokenizer, models.teacher, models.corpus, console)
    calibrate_cut(base_cfg, student, models.train, console)
    models = replace(models, student=student)
    checkpoint = None if found is None else {"path": found[0], **found[1]}
    try:
        trained = train(
            base_cfg,
            base_dir,
            models,
            (strategies, strategy_meta),
            checkpoint,
            None,
            console,
            show_progress,
            resume=again,
            exits_after_stop=exits_after_stop,
            label="baseline: CE only",
        )
        result = replace(trained.result, teacher_eval_ppl=trained.teacher_ppl)  # every process: the run's too
        if not state.is_main_process:
            return result
        try:
            return write_outputs(base_cfg, base_dir, trained, models, strategy_meta, result, wall_start)
        except KeyboardInterrupt:
            raise interrupted(trained.trainer, base_dir, True) from None
    except RunInterrupted as exc:  # the run is what the user resumes, and it continues the baseline
        raise RunInterrupted(
            exc.step, exc.signum, run_dir, exc.main_process, exc.resume_step, what="the CE-only baseline"
        ) from None


def write_outputs(
    cfg: RunConfig,
    run_dir: Path,
    trained: Trained,
    models: Models,
    strategy_meta: dict[str, Any],
    summary: RunSummary,
    wall_start: float,
) -> RunSummary:
    """The student (model and full weights, :meth:`Trainer.full_student`) with its model card, the
    difficulty history, the plots, and summary.json last."""
    trainer = trained.trainer
    if trained.student is not None:
        model, weights = trained.student
        with atomic_directory(run_dir / "student") as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            models.tokenizer.save_pretrained(tmp)
            write_model_card(tmp, render_model_card(cfg.to_dict(), strategy_meta, summary))
    write_history(run_dir / "difficulty.parquet", trainer.history.difficulty)
    summary = replace(
        summary,
        wall_seconds=time.perf_counter() - wall_start,
        difficulty_spearman=difficulty_spearman(trainer.strategies.scorer, models.train),
        strategy={kind: meta["name"] for kind, meta in strategy_meta.items()},
        strategy_params={kind: meta["params"] for kind, meta in strategy_meta.items()},
        teacher=cfg.model.teacher,
        student=cfg.model.student,
        seed=cfg.training.seed,
        run_dir=str(run_dir),
    )
    write_plots(run_dir, trained.metrics.records, trainer.history.difficulty)
    summary.write(run_dir)
    return summary


def make_trainer(
    cfg: RunConfig,
    models: Models,
    strategies: Strategies,
    run_dir: Path,
    metrics: MetricsWriter,
    tracking: Tracking,
    progress: TrainingProgress,
) -> Trainer:
    """The engine, wired to the run's metrics file, trackers, progress bar and checkpoints."""
    return Trainer(
        models.student,
        models.teacher,
        models.train,
        models.eval_set,
        strategies,
        cfg.training,
        cfg.strategy.temperature,
        run_dir=run_dir,
        on_log=tracking.wrap(metrics.write),
        on_progress=progress.update,
        log_with=tracking.log_with,
        project_dir=tracking.project_dir,
        teacher_cache=models.cache,
        checkpoints=Checkpointer(
            run_dir, cfg.training.checkpoint_every, cfg.output.keep_checkpoints, cfg.to_dict(), metrics.path
        ),
        pad_id=pad_id(models.tokenizer),
        eos_ids=eos_ids_of(models.tokenizer.eos_token_id, models.student),
    )


def check_early(cfg: RunConfig, resume: bool, console: Console) -> tuple[Strategies, dict[str, Any]]:
    """What fails in a second fails before anything loads: plugins, strategy parameters, model specs,
    trackers and ``--push-to-hub``; returns the run's strategies and their metadata."""
    if resume:  # before the strategies are built: a missing plugin is named with its package
        check_plugins(Path(cfg.output.dir), lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    strategies, strategy_meta = make_strategies(cfg.strategy)
    names = cfg.strategy.names()
    check_source(
        strategies.source,
        names["source"],
        strategies.reliance,
        names["reliance"],
        cfg.model.teacher_cache is not None,
    )
    check_sources(cfg.model.teacher, cfg.model.student)  # a typo fails now, not after the teacher has trained
    teacher_model = None if cfg.model.teacher_cache is not None else cfg.model.teacher
    remote = remote_code_warning(teacher_model, cfg.model.student, cfg.model.trust_remote_code)
    if remote:
        console.print(remote, style="yellow", highlight=False, markup=False, soft_wrap=True)
    for role, source in (("teacher", teacher_model), ("student", cfg.model.student)):
        if source is not None:
            config = model_config(source, trust_remote_code=cfg.model.trust_remote_code)
            check_seq_len(cfg.data.seq_len, config, role, source)
    resolve_trackers(cfg.output.report_to)  # a tracker that is not installed fails now, too
    parallel.check_placement(cfg.training.teacher_placement)
    check_push(cfg.output.push_to_hub, cfg.output.save_student)
    return strategies, strategy_meta


@dataclass
class Models:
    """The run's teacher (a model, or a teacher cache standing in for it), student, tokenizer and data
    (``corpus``: the text it was packed from, which a cut student's teacher is loaded with)."""

    teacher: Any
    cache: TeacherCache | None
    student: Any
    tokenizer: Any
    train: PackedDataset
    eval_set: PackedDataset
    corpus: Corpus


def load_models(cfg: RunConfig, console: Console) -> Models:
    """Data, teacher (or its cache), student, and the checks that they fit together."""
    corpus = load_corpus(cfg.data, cfg.training.seed)
    cache = None  # --teacher-cache: the teacher's top-K come from disk and no teacher model is loaded
    if cfg.model.teacher_cache is not None:
        from kdcore.teachers.cache import open_for_run

        cache, tokenizer = open_for_run(cfg, corpus, console)
        teacher = None
    else:
        teacher, tokenizer = load_teacher(cfg, corpus, console)
    student = resolve_student(cfg, tokenizer, teacher, corpus, console)
    check_vocabularies(
        cache.vocab_size if cache else teacher,
        student,
        tokenizer,
        (cfg.model.teacher, cfg.model.student),
        console,
    )
    notes: list[str] = []  # chat rows cut at seq_len or dropped
    train, eval_set = corpus.pack(tokenizer, cfg.data.seq_len, notes)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]", highlight=False)
    if cache is not None:
        cache.check_data(train, eval_set)
    calibrate_cut(cfg, student, train, console)
    return Models(teacher, cache, student, tokenizer, train, eval_set, corpus)


def difficulty_spearman(scorer: Any, train: Any) -> float | None:
    """Spearman correlation between the scorer's final scores and the demo corpus's known levels."""
    if train.levels is None:
        return None
    scores = scorer.scores()
    if scores is None:
        return None
    known = ~torch.isnan(scores)
    if known.sum() < 3:
        return None
    scores, levels = scores[known], train.levels[known]
    if bool((scores == scores[0]).all()) or bool((levels == levels[0]).all()):
        return None  # a constant has no rank correlation (scipy would warn and return NaN)
    from scipy.stats import spearmanr

    value = spearmanr(scores.numpy(), levels.numpy()).statistic
    return None if math.isnan(value) else float(value)
