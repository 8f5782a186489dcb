"""What a Trainer is set up with before its first step: the step count, the Accelerator, AdamW and its
schedule, and the checks of the batch size and of the teacher's prefetch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from kdcore.config import TrainingConfig
from kdcore.errors import KdError
from kdcore.training import parallel

__all__ = [
    "adamw_with_schedule",
    "check_batch_size",
    "check_micro_batches",
    "make_accelerator",
    "prefetch_problem",
    "total_steps",
]


def check_batch_size(batch_size: int, num_samples: int) -> None:
    """A batch draws distinct samples: it cannot be larger than the training set."""
    if batch_size > num_samples:
        raise KdError(
            f"training.batch_size {batch_size} is larger than the {num_samples} training samples; lower "
            f"--batch-size to at most {num_samples}, or train on more data"
        )


def check_micro_batches(training: TrainingConfig, world: int) -> None:
    """Every process trains on an equal share of every micro-batch."""
    if training.batch_size % (training.grad_accum * world):
        raise KdError(
            f"training.batch_size {training.batch_size} must be a multiple of grad_accum × processes "
            f"= {training.grad_accum} × {world}: each process trains on an equal share of every "
            "micro-batch"
        )


def prefetch_problem(
    cfg: TrainingConfig, teacher: torch.nn.Module | None, cache: Any, generates: bool
) -> str | None:
    """Why ``training.teacher_prefetch`` cannot be used in this run, or None (also when it is off)."""
    if not cfg.teacher_prefetch:
        return None
    if cache is not None or teacher is None:
        return "training.teacher_prefetch is not used: no live teacher runs (a teacher cache, or none)"
    if generates:
        return "training.teacher_prefetch is not used: the source writes each batch's text during the step"
    if parallel.shards_models(cfg.teacher_placement):
        return "training.teacher_prefetch is not used: the run shards its models over the processes"
    return None


def total_steps(cfg: TrainingConfig, num_samples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    epochs = cfg.epochs or 1.0
    return max(1, math.ceil(epochs * num_samples / cfg.batch_size))


def make_accelerator(
    training: TrainingConfig, log_with: list[str] | None, project_dir: Path | None
) -> Accelerator:
    """The run's Accelerator: mixed precision, the trackers (``log_with``), one scheduler step per step."""
    return Accelerator(
        mixed_precision=training.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=log_with,  # experiment trackers (kdcore.runs.trackers), None = no tracking
        project_dir=project_dir,
        # one scheduler step per optimizer step: every process steps on the same global batch
        step_scheduler_with_optimizer=False,
    )


def adamw_with_schedule(
    model: torch.nn.Module, training: TrainingConfig, steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and norms) with linear warm-up and cosine decay over ``steps``."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": training.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=training.lr,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(training.warmup_ratio * steps), steps)
    return optimizer, scheduler
