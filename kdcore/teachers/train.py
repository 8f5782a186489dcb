"""Training a causal LM with plain cross-entropy and saving it: ``kd train-teacher``, and a spec
teacher's first use (:func:`kdcore.teachers.resolve.resolve_teacher`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcore.config import StrategyConfig
from kdcore.errors import KdError
from kdcore.files import atomic_directory, atomic_write_json
from kdcore.inputs.cut import parse_cut_spec
from kdcore.inputs.models import (
    build_from_spec,
    check_seq_len,
    load_pretrained,
    load_tokenizer,
    model_config,
    parse_spec,
    quiet_transformers,
)
from kdcore.inputs.tokenization import build_tokenizer
from kdcore.summary import RunSummary
from kdcore.training.engine import Trainer, make_strategies
from kdcore.training.progress import TrainingProgress
from kdcore.training.setup import total_steps

if TYPE_CHECKING:
    from rich.console import Console

    from kdcore.config import RunConfig, TrainingConfig
    from kdcore.inputs.corpus import Corpus


def train_causal_lm(
    source: str,
    tokenizer: Any,
    corpus: Corpus,
    seq_len: int,
    training: TrainingConfig,
    out_dir: Path,
    console: Console,
) -> RunSummary:
    """Plain CE training of a from-scratch model (or a pretrained one: a directory, hub id or GGUF file),
    saved with save_pretrained into ``out_dir``."""
    spec = parse_spec(source)
    if spec is not None:
        model = build_from_spec(spec, tokenizer, training.seed)
    else:
        model = load_pretrained(source, echo=functools.partial(console.print, highlight=False))
    train, eval_set = corpus.pack(tokenizer, seq_len)
    strategies, _ = make_strategies(StrategyConfig(reliance="none"))
    progress = TrainingProgress(console, total_steps(training, len(train)), "teacher")
    trainer = Trainer(model, None, train, eval_set, strategies, training, 1.0, on_progress=progress.update)
    with progress:
        result = trainer.fit()
    trained, weights = trainer.full_student()  # every process takes part (FSDP gathers the weights)
    if trainer.accelerator.is_main_process:  # several processes train it together; one writes it
        with atomic_directory(out_dir) as tmp:
            trained.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(
                tmp / "kdcore_teacher.json",
                {"source": source, "eval_ppl": result.student_eval_ppl, "steps": result.steps},
            )
    trainer.accelerator.wait_for_everyone()
    console.print(f"Teacher eval perplexity {result.student_eval_ppl:.3f}, saved to {out_dir}")
    return result


def train_teacher(
    source: str, tokenizer: str | None, cfg: RunConfig, out_dir: Path, console: Console
) -> None:
    """``kd train-teacher``: the tokenizer is ``tokenizer`` for a spec, the model's own otherwise."""
    from kdcore.inputs.corpus import load_corpus

    if parse_cut_spec(source) is not None:
        raise KdError(
            f"'{source}' describes a student cut from a teacher, which kd run builds (--student); pass "
            "--model a spec, a directory, a hub id or a GGUF file"
        )
    quiet_transformers()  # kd's own progress bar is the only one: no "Writing model shards" from save_pretrained
    check_seq_len(cfg.data.seq_len, model_config(source), "model", source)
    corpus = load_corpus(cfg.data, cfg.training.seed)
    if parse_spec(source) is not None:
        tok = build_tokenizer(tokenizer or "byte", corpus.train_texts)
    else:
        tok = load_tokenizer(source)
    train_causal_lm(source, tok, corpus, cfg.data.seq_len, cfg.training, out_dir, console)
