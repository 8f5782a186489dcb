"""Shared set-up for the benchmarks: demo data, models from specs, engine trainers, timed steps.

Every benchmark measures its arms side by side in one process: the arms are built first, then timed
in interleaved rounds (A B C A B C ...), and each arm's figure is the median step time over all its
timed steps, so that a burst of load from another process hits every arm alike.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kdcore.config import DataConfig, StrategyConfig, TrainingConfig


@dataclass
class Setup:
    tokenizer: Any
    train: Any
    eval_set: Any
    teacher: torch.nn.Module
    student_spec: str
    teacher_spec: str
    batch_size: int
    seq_len: int


QUICK = {
    "teacher": "gpt2:n_layer=2,n_embd=64,n_head=2",
    "student": "gpt2:n_layer=1,n_embd=32,n_head=2",
    "seq_len": 64,
    "batch_size": 8,
    "samples": 120,
}
FULL = {
    "teacher": "gpt2:n_layer=4,n_embd=128,n_head=4",  # kd run's default teacher and student
    "student": "gpt2:n_layer=2,n_embd=48,n_head=2",
    "seq_len": 128,
    "batch_size": 16,
    "samples": 2000,
}


def setup(quick: bool, tokenizer_spec: str = "byte", threads: int | None = None) -> Setup:
    """The demo corpus packed like ``kd run`` packs it, a randomly initialised teacher (timing only)."""
    from transformers.utils import logging as hf_logging

    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import build_from_spec, parse_spec
    from kdcore.inputs.tokenization import build_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    p = QUICK if quick else FULL
    data = DataConfig(dataset="demo", seq_len=p["seq_len"], demo_samples=p["samples"], max_eval_samples=32)
    corpus = load_corpus(data, 0)
    tokenizer = build_tokenizer(tokenizer_spec, corpus.train_texts)
    train, eval_set = corpus.pack(tokenizer, p["seq_len"])
    teacher = build_from_spec(parse_spec(p["teacher"]), tokenizer, seed=1).eval()
    return Setup(
        tokenizer, train, eval_set, teacher, p["student"], p["teacher"], p["batch_size"], p["seq_len"]
    )


def student(s: Setup, seed: int = 0) -> torch.nn.Module:
    from kdcore.inputs.models import build_from_spec, parse_spec

    return build_from_spec(parse_spec(s.student_spec), s.tokenizer, seed)


def trainer(
    s: Setup,
    *,
    teacher: torch.nn.Module | None = None,
    cache: Any = None,
    reliance: str = "fixed",
    scorer: str = "none",
    pacing: str = "none",
    steps: int = 1000,
    reliance_params: dict | None = None,
    source: dict | None = None,
    student_model: torch.nn.Module | None = None,
    **training_fields: Any,
):
    """An engine :class:`~kdcore.training.engine.Trainer` prepared like ``fit()`` prepares it, not yet stepped
    (its student ``student_model``, else a fresh one from ``s.student_spec``; ``training_fields``:
    :class:`~kdcore.config.TrainingConfig` fields, e.g. ``mixed_precision``, ``loss_path``)."""
    from kdcore.inputs.tokenization import pad_id
    from kdcore.training.engine import Trainer, make_strategies

    strategy = StrategyConfig(
        reliance={"name": reliance, "params": reliance_params or {}},
        scorer=scorer,
        pacing=pacing,
        source=source or {"name": "dataset"},
    )
    strategies, _ = make_strategies(strategy)
    reset_accelerate()
    training = TrainingConfig(max_steps=steps, batch_size=s.batch_size, log_every=10**6, **training_fields)
    t = Trainer(
        student_model if student_model is not None else student(s),
        teacher,
        s.train,
        s.eval_set,
        strategies,
        training,
        2.0,
        teacher_cache=cache,
        pad_id=pad_id(s.tokenizer),
        eos_ids=(s.tokenizer.eos_token_id,),
    )
    t.strategies.scorer.prepare(t.scorer_context())
    t.student.train()
    t._bench_step = 0
    return t


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that another trainer (HF's, kdcore's) can set its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def engine_step(t) -> float:
    """One optimizer step of the engine (what ``fit()`` does per step, minus logging); its token count."""
    step = t._bench_step
    if t.sampler.needs_refresh(step):
        t.refresh(step)
    metrics = t.train_step(step)
    t._bench_step += 1
    return float(metrics["tokens"])


def interleave(arms: dict[str, Any], steps: int, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Run ``arms`` (name -> callable returning tokens) in rounds; median seconds per step, tokens/s."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():  # warm-up: first-call costs stay out of the figures
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in arms.items():
            for _ in range(steps):
                start = time.perf_counter()
                n = fn()
                times[name].append(time.perf_counter() - start)
                tokens[name].append(n)
    out = {}
    for name in arms:
        median = statistics.median(times[name])
        out[name] = {
            "median_s": median,
            "mean_s": statistics.fmean(times[name]),
            "tokens_per_s": sum(tokens[name]) / sum(times[name]),
            "tokens_per_step": statistics.fmean(tokens[name]),
            "steps": len(times[name]),
        }
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
