"""The training loop: one student step reads top to bottom in :meth:`Trainer.train_step`.

A step draws a batch from the curriculum sampler, runs the student (and the teacher when some λ
is non-zero or the scorer needs the KD term), computes per-sample CE and KD terms, weights them by
the reliance policy's λ, and hands the statistics it already has to the scorer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from kdcore.config import TrainingConfig
from kdcore.curriculum import CurriculumSampler
from kdcore.data import PackedDataset, shift_labels
from kdcore.evaluation import perplexity, sample_stats
from kdcore.losses import SampleTerms, per_sample_terms
from kdcore.strategies import DifficultyScorer, Divergence, PacingFunction, ReliancePolicy, ScorerContext


@dataclass
class Strategies:
    scorer: DifficultyScorer
    pacing: PacingFunction
    reliance: ReliancePolicy
    divergence: Divergence
    reverse: bool = False


@dataclass
class History:
    """What the loop records besides metrics: difficulty and λ per sample at each re-sort."""

    difficulty: list[dict[str, Any]] = field(default_factory=list)
    lambda_sum: float = 0.0
    lambda_count: int = 0
    open_share_last: float = 1.0


def total_steps(cfg: TrainingConfig, num_samples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    epochs = cfg.epochs or 1.0
    return max(1, math.ceil(epochs * num_samples / cfg.batch_size))


class Trainer:
    """Trains ``student`` on ``train``, distilling from ``teacher`` (None: labels only)."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        train: PackedDataset,
        eval_set: PackedDataset,
        strategies: Strategies,
        training: TrainingConfig,
        temperature: float,
        *,
        run_dir: Path | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.cfg = training
        self.train, self.eval_set = train, eval_set
        self.s = strategies
        self.base_temperature = temperature
        self.run_dir = run_dir
        self.on_log = on_log or (lambda record: None)
        self.on_progress = on_progress or (lambda step, metrics: None)
        self.total_steps = total_steps(training, len(train))
        self.accelerator = Accelerator(
            mixed_precision=training.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.device = self.accelerator.device
        self.history = History()

        decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": training.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=training.lr,
        )
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(training.warmup_ratio * self.total_steps), self.total_steps
        )
        self.student, self.optimizer, self.scheduler = self.accelerator.prepare(student, optimizer, scheduler)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.sampler = CurriculumSampler(
            len(train),
            training.batch_size,
            strategies.pacing,
            self.total_steps,
            training.seed,
            strategies.reverse,
        )
        self._teacher_stats: dict[str, torch.Tensor] | None = None
        self._student_stats: dict[str, torch.Tensor] | None = None

    # -- scorer context ---------------------------------------------------------------------------
    def scorer_context(self) -> ScorerContext:
        def teacher_stats() -> dict[str, torch.Tensor]:
            if self.teacher is None:
                raise RuntimeError("this scorer needs a teacher, and the run has none")
            if self._teacher_stats is None:
                self._teacher_stats = sample_stats(self.teacher, self.train)
            return self._teacher_stats

        def student_stats() -> dict[str, torch.Tensor]:
            if self._student_stats is None:
                self._student_stats = sample_stats(self.accelerator.unwrap_model(self.student), self.train)
            return self._student_stats

        return ScorerContext(
            num_samples=len(self.train),
            lengths=self.train.lengths(),
            seq_len=self.train.input_ids.shape[1],
            seed=self.cfg.seed,
            teacher_stats=teacher_stats,
            student_stats=student_stats,
            run_dir=self.run_dir,
        )

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        progress = step / self.total_steps
        temperature = self.s.reliance.temperature(self.base_temperature, progress)
        batch_ids = self.sampler.batch(step)
        totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "lambda": 0.0, "tokens": 0.0}
        for micro_ids in batch_ids.chunk(self.cfg.grad_accum):
            lam = self.s.reliance.weights(
                self.sampler.ranks[micro_ids], self.sampler.scores[micro_ids], progress
            )
            terms = self.forward(micro_ids, lam, temperature)
            lam = lam.to(terms.ce.device)
            per_sample = (1 - lam) * terms.ce + lam * terms.kd
            # Normalise by the whole accumulated batch, so accumulation 4x2 equals batch 8.
            loss = per_sample.sum() / len(batch_ids)
            self.accelerator.backward(loss)
            stats = {k: v.detach().float().cpu() for k, v in vars(terms).items()}
            self.s.scorer.observe(micro_ids, stats)
            for key, value in (
                ("loss", loss * len(batch_ids)),
                ("ce", terms.ce),
                ("kd", terms.kd),
                ("lambda", lam),
            ):
                totals[key] += value.detach().sum()
            totals["tokens"] += stats["tokens"].sum()
        if self.cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batch_ids)
        return {k: (v if k == "tokens" else v / n) for k, v in totals.items()}

    def forward(self, sample_ids: torch.Tensor, lam: torch.Tensor, temperature: float) -> SampleTerms:
        input_ids = self.train.input_ids[sample_ids].to(self.device)
        mask = self.train.attention_mask[sample_ids].to(self.device)
        labels = shift_labels(input_ids, mask)
        student_logits = self.student(input_ids=input_ids, attention_mask=mask).logits
        teacher_logits = None
        if self.teacher is not None and (bool((lam > 0).any()) or "kd" in self.s.scorer.needs):
            teacher_logits = self.teacher_logits(sample_ids, input_ids, mask)
        return per_sample_terms(student_logits, labels, teacher_logits, self.s.divergence, temperature)

    @torch.no_grad()
    def teacher_logits(
        self, sample_ids: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's logits for a micro-batch (a live forward pass)."""
        return self.teacher(input_ids=input_ids, attention_mask=mask).logits

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        set_seed(self.cfg.seed)
        self.s.scorer.prepare(self.scorer_context())
        eval_every = self.cfg.eval_every or max(1, self.total_steps // 4)
        curve = [(0, self.evaluate())]
        self.student.train()
        running: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        train_seconds, tokens_total = 0.0, 0.0
        for step in range(self.total_steps):
            if self.sampler.needs_refresh(step):
                self.refresh(step)
            metrics = self.train_step(step)
            for key, value in metrics.items():
                running[key] = running.get(key, 0.0) + value
            window_steps += 1
            done = step + 1
            if done % self.cfg.log_every == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - window_start
                tokens = float(running.pop("tokens"))
                self.history.lambda_sum += float(running["lambda"])
                self.history.lambda_count += window_steps
                record = {"step": done, **{k: float(v) / window_steps for k, v in running.items()}}
                record.update(
                    open_share=self.sampler.open_count(step) / len(self.train),
                    lr=self.scheduler.get_last_lr()[0],
                    tokens_per_second=tokens / max(elapsed, 1e-9),
                )
                train_seconds += elapsed
                tokens_total += tokens
                self.on_log(record)
                self.on_progress(done, record)
                running, window_steps = {}, 0
                window_start = time.perf_counter()
            if done % eval_every == 0 or done == self.total_steps:
                eval_start = time.perf_counter()
                ppl = self.evaluate()
                curve.append((done, ppl))
                self.on_log({"step": done, "eval_ppl": ppl})
                window_start += time.perf_counter() - eval_start  # eval time is not training time
        self.history.open_share_last = self.sampler.open_count(self.total_steps - 1) / len(self.train)
        return {
            "steps": self.total_steps,
            "eval_curve": curve,
            "student_eval_ppl": curve[-1][1],
            "student_initial_eval_ppl": curve[0][1],
            "train_tokens": tokens_total,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens_total / max(train_seconds, 1e-9),
            "mean_lambda": self.history.lambda_sum / max(self.history.lambda_count, 1),
            "final_open_share": self.history.open_share_last,
        }

    def refresh(self, step: int) -> None:
        """Re-sort the curriculum from the scorer's current scores and record them."""
        self.sampler.refresh(self.s.scorer.scores(), step)
        progress = step / self.total_steps
        lam = self.s.reliance.weights(self.sampler.ranks, self.sampler.scores, progress)
        self.history.difficulty.append(
            {
                "step": step,
                "scores": self.sampler.scores.clone(),
                "ranks": self.sampler.ranks.clone(),
                "lambda": lam,
            }
        )

    def evaluate(self) -> float:
        return perplexity(self.accelerator.unwrap_model(self.student), self.eval_set)

    def unwrapped_student(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.student)
