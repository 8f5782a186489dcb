"""``kd run --dry-run``: check everything a run needs, estimate its size, and train nothing.

In order: the strategies (plugins load, parameters validate), the trackers and ``--push-to-hub``,
the data (the corpus is loaded and packed with the real tokenizer), the tokenizer (a from-scratch
teacher's is built, or read from the teacher cache; a directory's, hub id's or GGUF file's is
loaded), and the models' *configs* (``AutoConfig.for_model`` for a spec, ``AutoConfig.from_pretrained``
for a directory or hub id, the file's metadata for a GGUF file, the teacher's config with fewer
layers for a student cut from it: no weights are loaded, no teacher is trained and no GGUF file is
converted). Then the vocabularies are checked exactly as a run checks them, the source runs its own
check (``Source.check``, with the data's lengths and the models' position limit, as the engine calls
it before training), and a table shows samples, steps per epoch, total steps,
parameter counts (counted on the ``meta`` device, without memory) and an estimate of the memory of
one micro-batch's logits.

The loss path is decided as the run decides it (:func:`~kdcore.training.loss_path.choose_loss_path`,
on models built on the ``meta`` device) and shown. The loss's memory, per micro-batch of
``B = batch_size / grad_accum`` samples of ``L`` tokens, on the logits path:

- student logits ``B·L·V_s`` and their gradient, at 2 bytes under fp16/bf16 mixed precision, else 4;
- teacher logits ``B·L·V_t`` at 4 bytes (the teacher runs outside autocast);
- with ``--teacher-cache`` instead: the top-K rows ``B·L·K`` at 12 bytes (log-prob and token id), on
  either path;
- the loss's float32 working copies: it works on ``min(2048, B·L)`` tokens at a time and holds about
  four ``V``-wide copies of them (student and teacher log-softmax at temperature τ, the divergence's
  temporaries).

On the fused path no logits tensor exists; instead:

- the final hidden states: the student's ``B·L·H_s`` and their gradient (2 bytes each under mixed
  precision, else 4), a live teacher's ``B·L·H_t`` at 4 bytes (a teacher cache's top-K rows instead);
- one chunk of ``CHUNK_ELEMENTS`` (4M) float32 elements at a time, about six ``V``-wide copies of it
  (both models' logits and log-softmaxes, the divergence's temporary, the logits' gradient).

Weights: the student's parameters cost 16 bytes each in training (fp32 weights, gradients and
AdamW's two moments), the teacher's 4. Activations other than the logits are not counted, so the
estimate is a lower bound: when it exceeds the memory available now (free GPU memory on a GPU, else
available RAM) the dry run prints its table and fails, since the run cannot fit.

Nothing is written: no run directory, no teacher cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcore.config import RunConfig
from kdcore.errors import KdError
from kdcore.formats import human_bytes
from kdcore.runs.baseline import BASELINE_DIR, baseline_config

LOSS_CHUNK_TOKENS = 2048  # kdcore.training.losses.per_sample_terms' default chunk_tokens
LOSS_COPIES = 4
FUSED_COPIES = 6


@dataclass
class ModelInfo:
    source: str
    kind: str  # "spec", "directory", "hub", "GGUF file", "cached teacher", "teacher cache, top-K", ...
    vocab_size: int
    parameters: int | None
    hidden_size: int | None = None
    meta: Any = field(default=None, repr=False)  # the model built on the meta device, if it could be
    config: Any = field(default=None, repr=False)  # its config (None: a teacher cache stands in for it)


@dataclass
class DryRunReport:
    """What ``kd run --dry-run`` found; sizes in bytes."""

    strategies: dict[str, str]
    trackers: list[str]
    tokenizer_size: int
    teacher: ModelInfo
    student: ModelInfo
    train_samples: int
    eval_samples: int
    steps_per_epoch: int
    total_steps: int
    micro_batch: int
    seq_len: int
    loss_path: str = "logits"
    loss_path_reason: str = ""
    memory: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    available: tuple[int, str] | None = None  # bytes free now, and where (RAM or a GPU)

    def estimated_bytes(self) -> int:
        """The logits (or the fused loss), the student's training state and the teacher's weights: what one
        step needs at least."""
        parts = ("logits total", "loss total", "student weights + grads + AdamW", "teacher weights")
        return sum(self.memory.get(part, 0) for part in parts)


def logits_memory(
    micro_batch: int, seq_len: int, vocab_student: int, vocab_teacher: int | None, mixed_precision: str
) -> dict[str, int]:
    """Bytes of one micro-batch's logits and the loss's softmax copies (see the module docstring)."""
    tokens = micro_batch * seq_len
    student_bytes = 2 if mixed_precision in ("fp16", "bf16") else 4
    shared = min(vocab_student, vocab_teacher) if vocab_teacher else vocab_student
    memory = {
        "student logits": tokens * vocab_student * student_bytes,
        "student logits gradient": tokens * vocab_student * student_bytes,
        "teacher logits": tokens * vocab_teacher * 4 if vocab_teacher else 0,
        "loss softmax copies": min(LOSS_CHUNK_TOKENS, tokens) * shared * 4 * LOSS_COPIES,
    }
    memory["logits total"] = sum(memory.values())
    return memory


def fused_memory(
    micro_batch: int,
    seq_len: int,
    student: tuple[int, int],
    teacher: tuple[int, int] | None,
    mixed_precision: str,
) -> dict[str, int]:
    """Bytes of one micro-batch's hidden states and the fused loss's chunk; ``student`` and ``teacher`` are
    ``(hidden size, vocabulary)`` (see the module docstring)."""
    from kdcore.training.fused_loss import CHUNK_ELEMENTS

    tokens = micro_batch * seq_len
    student_bytes = 2 if mixed_precision in ("fp16", "bf16") else 4
    widest = max(student[1], teacher[1] if teacher else 0)
    chunk_rows = min(tokens, max(1, CHUNK_ELEMENTS // widest))
    memory = {
        "student hidden states and gradient": 2 * tokens * student[0] * student_bytes,
        "teacher hidden states": tokens * teacher[0] * 4 if teacher else 0,
        "fused loss chunk": chunk_rows * widest * 4 * FUSED_COPIES,
    }
    memory["loss total"] = sum(memory.values())
    return memory


def available_memory() -> tuple[int, str]:
    """Bytes a run could use now: free memory of the current GPU, else available RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0]), f"GPU memory ({torch.cuda.get_device_name()})"
    import psutil

    return int(psutil.virtual_memory().available), "RAM"


def check_memory(report: DryRunReport) -> None:
    """Refuse a run whose estimate (a lower bound) does not fit in the memory available."""
    if report.available is None:
        return
    free, where = report.available
    need = report.estimated_bytes()
    total = "logits total" if "logits total" in report.memory else "loss total"
    loss = "logits" if total == "logits total" else "fused loss"
    if need > free:
        raise KdError(
            f"this run needs at least {human_bytes(need)} (one micro-batch's {loss} "
            f"{human_bytes(report.memory.get(total, 0))}, plus the weights) but only "
            f"{human_bytes(free)} of {where} is available; lower --batch-size or --seq-len, or raise --grad-accum for smaller micro-batches"
        )


def meta_model(config: Any, trust_remote_code: bool = False) -> Any | None:
    """The model ``config`` describes, built on the meta device (no memory); None when that fails."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture that cannot be built on meta: what it tells is only informative
        return None


def _info(source: str, kind: str, config: Any, trust_remote_code: bool) -> ModelInfo:
    meta = meta_model(config, trust_remote_code)
    parameters = None if meta is None else sum(p.numel() for p in meta.parameters())
    hidden = getattr(config, "hidden_size", None)
    return ModelInfo(source, kind, int(config.vocab_size), parameters, hidden, meta, config)


def _spec_config(spec: Any, tokenizer: Any) -> Any:
    try:
        return spec.config(len(tokenizer))
    except (ValueError, TypeError) as exc:
        raise KdError(
            f"cannot build a config from spec '{spec.model_type}': {str(exc).splitlines()[0]}"
        ) from None


def dry_run(cfg: RunConfig, console: Console | None = None) -> DryRunReport:
    """Check ``cfg`` end to end without training; print a table to ``console`` (when given)."""
    from kdcore.inputs.chat import ChatCorpus
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import check_sources, check_vocab_sizes, quiet_transformers, remote_code_warning
    from kdcore.plugins import instantiate_strategies
    from kdcore.runs.model_card import check_push
    from kdcore.runs.trackers import resolve_trackers
    from kdcore.training.setup import check_batch_size, total_steps
    from kdcore.training.sources import check_source, source_context

    quiet_transformers()
    built = instantiate_strategies(cfg.strategy)
    strategies = {
        kind: f"{pair[1]['name']} ({pair[1].get('distribution', '?')})" for kind, pair in built.items()
    }
    names = cfg.strategy.names()
    check_source(
        built["source"][0],
        names["source"],
        built["reliance"][0],
        names["reliance"],
        cfg.model.teacher_cache is not None,
    )
    trackers = resolve_trackers(cfg.output.report_to)
    check_push(cfg.output.push_to_hub, cfg.output.save_student)
    check_sources(cfg.model.teacher, cfg.model.student)  # a typo fails now, before the data loads
    model = cfg.model
    remote = remote_code_warning(
        None if model.teacher_cache is not None else model.teacher, model.student, model.trust_remote_code
    )
    if remote and console is not None:
        console.print(remote, style="yellow", highlight=False, markup=False, soft_wrap=True)
    notes: list[str] = []

    corpus = load_corpus(cfg.data, cfg.training.seed)
    if isinstance(corpus, ChatCorpus):
        notes.append("chat data: one sample per row; CE, KD and perplexity count the assistant tokens only")
    tokenizer, teacher, cache, teacher_config = _check_teacher(cfg, corpus, notes)
    student = _check_student(cfg.model, tokenizer, teacher_config, cfg.data.seq_len)
    note = check_vocab_sizes(
        len(tokenizer), teacher.vocab_size, student.vocab_size, cfg.model.teacher, cfg.model.student
    )
    if note:
        notes.append(note)

    train, eval_set = corpus.pack(tokenizer, cfg.data.seq_len, notes)
    if cache is not None:
        cache.check_data(train, eval_set)
    # the source's own check, as the engine calls it once the models are loaded
    built["source"][0].check(source_context(train, student.config, teacher_config))
    from kdcore.training.loss_path import choose_loss_path

    t = cfg.training
    check_batch_size(t.batch_size, len(train))
    if cfg.output.baseline:
        notes.append(baseline_note(cfg, total_steps(t, len(train))))
    from kdcore.training import parallel

    path, reason = choose_loss_path(
        t.loss_path,
        student.meta,
        teacher.meta,
        cache is not None,
        sharded=parallel.shards_models(t.teacher_placement),
        generates=built["source"][0].generates(),
    )
    report = DryRunReport(
        strategies=strategies,
        trackers=trackers,
        tokenizer_size=len(tokenizer),
        teacher=teacher,
        student=student,
        train_samples=len(train),
        eval_samples=len(eval_set),
        steps_per_epoch=math.ceil(len(train) / t.batch_size),
        total_steps=total_steps(t, len(train)),
        micro_batch=t.batch_size // t.grad_accum,
        seq_len=cfg.data.seq_len,
        loss_path=path,
        loss_path_reason=reason,
        memory=_memory(cfg, teacher, student, cache.top_k if cache is not None else None, path),
        notes=notes,
        available=available_memory(),
    )
    if console is not None:
        print_dry_run(console, cfg, report)
    check_memory(report)
    return report


def baseline_note(cfg: RunConfig, steps: int) -> str:
    if baseline_config(cfg, Path("RUN_DIR")) is None:
        return "--baseline: this run is the CE-only student already; no baseline is trained"
    return (
        f"--baseline: the CE-only student is trained too, in RUN_DIR/{BASELINE_DIR}: {steps:,} more steps, "
        "without the teacher"
    )


def _check_teacher(cfg: RunConfig, corpus: Any, notes: list[str]) -> tuple[Any, ModelInfo, Any, Any]:
    """The tokenizer, what is known of the teacher, the teacher cache (if any) and the teacher's config
    (None when a cache stands in for the teacher and no student is cut from it); no weights are loaded,
    no teacher is trained and no GGUF file is converted."""
    from kdcore.inputs.cut import parse_cut_spec
    from kdcore.inputs.models import check_seq_len
    from kdcore.teachers.resolve import locate_teacher

    model = cfg.model
    teacher = locate_teacher(model, corpus, cfg.data.seq_len, cfg.training)
    if model.teacher_cache is not None:  # kd run --teacher-cache: no teacher model is loaded
        from kdcore.teachers.cache import open_for_run

        cache, tokenizer = open_for_run(cfg, corpus, Console(quiet=True))
        cut = parse_cut_spec(model.student) is not None
        notes.append(
            f"the teacher's top-{cache.top_k} come from {cache.directory}; "
            + (
                "the teacher's weights are loaded to cut the student, then freed"
                if cut
                else "no teacher model is loaded"
            )
        )
        config = _teacher_config(teacher, tokenizer, model.trust_remote_code) if cut else None
        info = ModelInfo(model.teacher, f"teacher cache, top-{cache.top_k}", cache.vocab_size, None)
        return tokenizer, info, cache, config
    tokenizer = teacher.tokenizer(corpus)
    config = _teacher_config(teacher, tokenizer, model.trust_remote_code)
    if not teacher.trained:
        notes.append(
            f"the teacher will be trained for {model.teacher_steps} steps, then cached in {teacher.directory}"
        )
    elif teacher.spec is not None:
        notes.append(f"the teacher is cached in {teacher.directory}")
    elif teacher.kind == "GGUF file":
        notes.append(_gguf_note(model.teacher))
    check_seq_len(cfg.data.seq_len, config, "teacher", model.teacher)
    return tokenizer, _info(model.teacher, teacher.kind, config, model.trust_remote_code), None, config


def _teacher_config(teacher: Any, tokenizer: Any, trust_remote_code: bool) -> Any:
    """The config of a located teacher: its spec's, its cached training's, or its own."""
    from kdcore.inputs.models import pretrained_config

    if not teacher.trained:
        return _spec_config(teacher.spec, tokenizer)
    return pretrained_config(teacher.source, trust_remote_code=trust_remote_code and teacher.spec is None)


def _gguf_note(source: str) -> str:
    from kdcore.inputs.gguf import converted_directory

    directory = converted_directory(source, convert=False)
    if directory is None:
        return f"'{source}' is converted once (de-quantised to float32) on first use and cached"
    return f"'{source}' loads from its converted copy in {directory}"


def _check_student(model: Any, tokenizer: Any, teacher_config: Any, seq_len: int) -> ModelInfo:
    """What is known of the student from its config; a pretrained one must share the teacher's tokenizer."""
    from kdcore.inputs.cut import cut_config, parse_cut_spec
    from kdcore.inputs.gguf import parse_gguf_source
    from kdcore.inputs.models import check_seq_len, check_student_tokenizer, parse_spec, pretrained_config

    trust = model.trust_remote_code
    cut, spec = parse_cut_spec(model.student), parse_spec(model.student)
    if cut is not None:
        layers = cut.select(teacher_config.num_hidden_layers)
        config = cut_config(teacher_config, layers)
        kind = f"cut from the teacher's layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    elif spec is not None:
        config, kind = _spec_config(spec, tokenizer), "spec"
    else:
        config = pretrained_config(model.student, trust_remote_code=trust)
        if parse_gguf_source(model.student) is not None:
            kind = "GGUF file"
        else:
            kind = "directory" if _is_dir(model.student) else "hub"
        check_student_tokenizer(tokenizer, model)
    check_seq_len(seq_len, config, "student", model.student)
    return _info(model.student, kind, config, trust)


def _memory(
    cfg: RunConfig, teacher: ModelInfo, student: ModelInfo, cache_top_k: int | None, path: str
) -> dict[str, int]:
    """The memory estimate of the module docstring, by item."""
    t, seq_len = cfg.training, cfg.data.seq_len
    micro = t.batch_size // t.grad_accum
    teacher_needed = cfg.strategy.reliance.name != "none"
    live = teacher_needed and cache_top_k is None
    if path == "fused":
        sizes = (teacher.hidden_size or 0, teacher.vocab_size) if live else None
        memory = fused_memory(
            micro, seq_len, (student.hidden_size or 0, student.vocab_size), sizes, t.mixed_precision
        )
    else:
        memory = logits_memory(
            micro, seq_len, student.vocab_size, teacher.vocab_size if live else None, t.mixed_precision
        )
    if cache_top_k is not None and teacher_needed:  # top-K log-probs (float32) and ids (int64) per position
        rows = micro * seq_len * cache_top_k * (4 + 8)
        if path == "fused":  # the student's hidden states and chunk, and the top-K rows
            total = memory.pop("loss total") - memory.pop("teacher hidden states")
            memory["teacher top-K rows"] = rows
            memory["loss total"] = total + rows
        else:
            total = memory.pop("logits total") - memory.pop("teacher logits")
            memory["teacher top-K rows"] = rows
            memory["logits total"] = total + rows
    if student.parameters is not None:
        memory["student weights + grads + AdamW"] = student.parameters * 16
    if teacher.parameters is not None and teacher_needed:
        memory["teacher weights"] = teacher.parameters * 4
    return memory


def _is_dir(source: str) -> bool:
    from pathlib import Path

    return Path(source).is_dir()


def data_row(cfg: RunConfig, report: DryRunReport) -> str:
    row = f"{cfg.data.dataset}: {report.train_samples:,} train / {report.eval_samples:,} eval samples"
    if cfg.data.student_share < 1:
        row += f" (train: the first {cfg.data.student_share:g} of the training text)"
    return row


def print_dry_run(console: Console, cfg: RunConfig, report: DryRunReport) -> None:
    from rich.markup import escape

    table = Table(title=f"kd run --dry-run: {cfg.strategy.label()} (nothing trained, nothing written)")
    table.add_column("check")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = list(report.strategies.items())
    rows.append(("trackers", ", ".join(report.trackers) or "none"))
    if cfg.output.push_to_hub:
        rows.append(("push to hub", cfg.output.push_to_hub))
    for role, info in (("teacher", report.teacher), ("student", report.student)):
        params = f"{info.parameters:,} parameters" if info.parameters is not None else "parameters unknown"
        rows.append((role, f"{info.source} ({info.kind}): vocabulary {info.vocab_size:,}, {params}"))
    rows += [
        ("tokenizer", f"{report.tokenizer_size:,} tokens: vocabularies ok"),
        ("data", data_row(cfg, report)),
        ("steps per epoch", f"{report.steps_per_epoch:,} (batch {cfg.training.batch_size})"),
        ("total steps", f"{report.total_steps:,}"),
        ("micro-batch", f"{report.micro_batch} × {report.seq_len} tokens"),
        ("loss path", f"{report.loss_path}: {report.loss_path_reason}"),
    ]
    rows += [(f"memory: {name}", human_bytes(size)) for name, size in report.memory.items()]
    if report.available is not None:
        rows.append((f"memory: available {report.available[1]}", human_bytes(report.available[0])))
    rows += [("note", note) for note in report.notes]
    for name, value in rows:
        table.add_row(escape(name), escape(value))  # paths and sources may hold [brackets]
    console.print(table)
