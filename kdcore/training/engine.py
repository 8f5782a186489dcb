"""The training loop: one student step reads top to bottom in :meth:`Trainer.train_step`.

A step draws a batch from the curriculum sampler, asks the source for its rows (the dataset's, or
continuations written by a model), runs the student (and the teacher when some λ is non-zero or the
scorer needs the KD term), computes per-sample CE and KD terms, weights them by the reliance policy's
λ, and hands the statistics it already has to the scorer.

The terms come one of two ways, fused or logits, decided once per run; :mod:`kdcore.training.loss_path`
chooses the path and runs the models' forward passes on it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from accelerate.utils import set_seed

from kdcore.config import StrategyConfig, TrainingConfig
from kdcore.errors import KdError, RunInterrupted
from kdcore.inputs.packing import PackedDataset
from kdcore.plugins import instantiate_strategies
from kdcore.strategies import (
    DifficultyScorer,
    Divergence,
    PacingFunction,
    ReliancePolicy,
    ScorerContext,
    Source,
    SourceRows,
    Strategy,
    prompt_lengths,
)
from kdcore.summary import RunSummary
from kdcore.training import parallel
from kdcore.training.checkpoint import Checkpointer, GracefulStop, read_state
from kdcore.training.curriculum import CurriculumSampler
from kdcore.training.evaluation import nll_totals, perplexity, sample_stats
from kdcore.training.loss_path import CachedTeacher, LossPath, choose_loss_path
from kdcore.training.losses import SampleTerms
from kdcore.training.onpolicy_eval import on_policy_kl_totals
from kdcore.training.onpolicy_loss import sample_losses
from kdcore.training.prefetch import TeacherPrefetcher
from kdcore.training.setup import (
    adamw_with_schedule,
    check_batch_size,
    check_micro_batches,
    make_accelerator,
    prefetch_problem,
    total_steps,
)
from kdcore.training.sources import BatchRequest, GenerationClock, dataset_rows, source_context

S = TypeVar("S", bound=Strategy)


class _OfKind(Generic[S]):
    """``Strategies.scorer`` and the like: the strategy of the kind the attribute is named after."""

    def __init__(self) -> None:
        self.kind = ""  # the attribute's name, set when the class is created

    def __set_name__(self, owner: type, name: str) -> None:
        self.kind = name

    def __get__(self, strategies: Strategies | None, owner: type | None = None) -> S:
        if strategies is None:  # looked up on the class
            return self  # type: ignore[return-value]
        return strategies.by_kind[self.kind]  # type: ignore[return-value]


@dataclass
class Strategies:
    """The run's strategies, one per kind of :data:`~kdcore.strategies.KINDS`, and the curriculum options.

    Checkpoints save and restore every kind in ``by_kind``; the properties name the ones the step uses.
    """

    by_kind: dict[str, Strategy]
    reverse: bool = False
    refresh_every: int | None = None

    scorer: ClassVar[_OfKind[DifficultyScorer]] = _OfKind()
    pacing: ClassVar[_OfKind[PacingFunction]] = _OfKind()
    reliance: ClassVar[_OfKind[ReliancePolicy]] = _OfKind()
    divergence: ClassVar[_OfKind[Divergence]] = _OfKind()
    source: ClassVar[_OfKind[Source]] = _OfKind()


@dataclass
class History:
    """What the loop records besides metrics.jsonl; checkpointed whole, so a resumed run reports the same."""

    difficulty: list[dict[str, Any]] = field(default_factory=list)  # scores, ranks, λ at each re-sort
    lambda_sum: float = 0.0
    lambda_count: int = 0
    open_share_last: float = 1.0
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    window: dict[str, Any] = field(default_factory=dict)  # metric sums since the last log line
    window_steps: int = 0
    window_seconds: float = 0.0  # training time in that window when it was checkpointed
    train_seconds: float = 0.0  # eval and checkpoint time excluded
    tokens: float = 0.0
    generation_seconds: float = 0.0  # of train_seconds, spent writing continuations
    onpolicy_kl: list[tuple[int, float | None]] = field(default_factory=list)  # held-out, at start and end
    skipped_steps: list[int] = field(default_factory=list)  # non-finite loss, training.on_nonfinite=skip


def make_strategies(cfg: StrategyConfig) -> tuple[Strategies, dict[str, Any]]:
    """The run's strategies, and their names, parameters and providing packages for the metadata."""
    built = instantiate_strategies(cfg)
    strategies = Strategies(
        {kind: pair[0] for kind, pair in built.items()}, reverse=cfg.reverse, refresh_every=cfg.refresh_every
    )
    return strategies, {kind: pair[1] for kind, pair in built.items()}


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
        log_with: list[str] | None = None,
        project_dir: Path | None = None,
        teacher_cache: CachedTeacher | None = None,
        checkpoints: Checkpointer | None = None,
        pad_id: int = 0,
        eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.cfg = training
        self.checkpoints = checkpoints  # None: no checkpoints, and SIGINT/SIGTERM stop at once
        # A teacher cache stands in for the teacher model: sparse top-K logits, stats from the cache.
        self.teacher_cache = teacher_cache
        self.train, self.eval_set = train, eval_set
        self.strategies = strategies
        self.base_temperature = temperature
        self.run_dir = run_dir
        self.on_log = on_log or (lambda record: None)
        self.on_progress = on_progress or (lambda step, metrics: None)
        check_batch_size(training.batch_size, len(train))
        self.total_steps = total_steps(training, len(train))
        self.accelerator = make_accelerator(training, log_with, project_dir)
        parallel.check_backend(self.accelerator.distributed_type)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        check_micro_batches(training, self.world)
        #: what a checkpoint records about how it was written (compared on resume)
        self.layout = {**parallel.backend(self.world), "dropout": parallel.dropout_in(student)}
        if self.layout["type"] == "deepspeed":
            parallel.configure_deepspeed(self.accelerator, training, self.world)
        if not self.accelerator.is_main_process:  # only the main process writes metrics and files
            self.on_log, self.run_dir = (lambda record: None), None
        self.history = History()
        self.step = 0  # optimizer steps done
        self._window_start = 0.0  # perf_counter() at the start of the current log window (set by fit)
        optimizer, scheduler = adamw_with_schedule(student, training, self.total_steps)
        self.student, self.optimizer, self.scheduler = self.accelerator.prepare(student, optimizer, scheduler)
        self.loss_path, self.loss_path_reason = choose_loss_path(
            training.loss_path,
            student,
            teacher,
            teacher_cache is not None,
            sharded=parallel.shards_models(training.teacher_placement),
            generates=strategies.source.generates(),
        )
        self.teacher = self.place_teacher(teacher) if teacher is not None else None
        self.passes = LossPath(
            (self.loss_path, self.loss_path_reason),
            self.student,
            self.teacher,
            teacher_cache,
            strategies.divergence,
            self.accelerator,
        )
        self.pad_id, self.eos_ids = pad_id, eos_ids  # what continuations are padded with and end at
        strategies.source.check(source_context(train, student, teacher))
        self.sampler = CurriculumSampler(
            len(train),
            training.batch_size,
            strategies.pacing,
            self.total_steps,
            training.seed,
            strategies.reverse,
            strategies.refresh_every,
        )
        self._teacher_stats: dict[str, torch.Tensor] | None = None
        self._student_stats: dict[str, torch.Tensor] | None = None
        #: why training.teacher_prefetch is not used (None: it is, or it is off)
        self.prefetch_note = prefetch_problem(
            training, self.teacher, teacher_cache, strategies.source.generates()
        )
        self.prefetcher: TeacherPrefetcher | None = None  # started by the first step that prefetches

    # -- scorer context ---------------------------------------------------------------------------
    def scorer_context(self) -> ScorerContext:
        def teacher_stats() -> dict[str, torch.Tensor]:
            if self.teacher_cache is not None:
                return self.teacher_cache.stats()
            if self.teacher is None:
                raise RuntimeError("this scorer needs a teacher, and the run has none")
            if self._teacher_stats is None:
                self._teacher_stats = self.sample_stats(self.teacher, self.train)
            return self._teacher_stats

        def student_stats() -> dict[str, torch.Tensor]:
            if self._student_stats is None:
                self._student_stats = self.sample_stats(
                    self.accelerator.unwrap_model(self.student), self.train
                )
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
    def train_step(self, step: int) -> dict[str, torch.Tensor] | None:
        """One optimizer step on the global batch of ``step``; None if a non-finite loss skipped it."""
        progress = step / self.total_steps
        temperature = self.strategies.reliance.temperature(self.base_temperature, progress)
        batch_ids = self.sampler.batch(step)  # the same global batch on every process
        micro_batches = batch_ids.chunk(self.cfg.grad_accum)
        mine = slice(self.rank, None, self.world)  # this process's share of each micro-batch
        totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "lambda": 0.0, "tokens": 0.0, "generated": 0.0}
        losses = []
        for i, micro_ids in enumerate(micro_batches):
            lam = self.strategies.reliance.weights(
                self.sampler.ranks[micro_ids], self.sampler.scores[micro_ids], progress
            )
            with_teacher = self.needs_teacher(lam)
            ahead = self.prefetcher.take(step, micro_ids[mine]) if self.prefetcher is not None else None
            if ahead is not None:  # the rows and the teacher's output, computed during the last micro-batch
                rows, teacher_out = ahead
            else:
                rows, teacher_out = self.source_rows(micro_ids[mine], step, progress), None
            if with_teacher:
                self.prefetch_next(step, i, micro_batches)
            with self.gradient_sync(last=i == len(micro_batches) - 1):
                lam_mine = lam[mine].to(self.device)
                terms, observed = self.passes.forward(
                    rows, micro_ids[mine], lam_mine, temperature, with_teacher, teacher_out
                )
                per_sample = sample_losses(terms, lam_mine, rows.labelled)  # λ·KD alone on the student's text
                # DDP averages gradients over processes: dividing each process's sum by batch/processes
                # makes the update the mean over the whole global batch (and accumulation 4x2 = batch 8).
                self.accelerator.backward(per_sample.sum() * self.world / len(batch_ids))
            stats = self.gather_stats(observed, per_sample, rows.generated)  # the whole micro-batch
            losses.append(stats.pop("loss"))
            self.strategies.scorer.observe(micro_ids, stats)
            for key in ("ce", "kd", "tokens", "generated"):
                totals[key] += stats[key].sum()
            totals["loss"] += losses[-1].sum()
            totals["lambda"] += lam.sum()
        # One finiteness check per step, on the CPU copies the scorer needed anyway: no extra sync.
        finite = torch.isfinite(torch.cat(losses))
        if not finite.all():
            return self.nonfinite(step, batch_ids[~finite], "loss")
        # The norm before clipping (no limit: only measured), the same on every process; a wrong loss
        # scale shows here at once while Adam and clipping hide it in the weights.
        norm = self.accelerator.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm or math.inf)
        norm = None if norm is None else float(norm)  # a tensor, or DeepSpeed's float
        fp16 = self.cfg.mixed_precision == "fp16"  # with fp16, inf gradients are the scaler's job
        if norm is not None and not fp16 and not math.isfinite(norm):
            return self.nonfinite(step, batch_ids, "gradient")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batch_ids)
        metrics = {k: (v if k == "tokens" else v / n) for k, v in totals.items()}
        if norm is not None:
            metrics["grad_norm"] = norm
        return metrics

    def prefetch_next(self, step: int, i: int, micro_batches: tuple[torch.Tensor, ...]) -> None:
        """Start the teacher's pass on the micro-batch after ``(step, i)`` in the background, when
        ``training.teacher_prefetch`` is used and that micro-batch is known (:mod:`kdcore.training.prefetch`)."""
        if self.prefetch_note is not None or not self.cfg.teacher_prefetch:
            return
        if i + 1 < len(micro_batches):
            next_step, ids = step, micro_batches[i + 1]
        else:
            next_step = step + 1
            if next_step >= self.total_steps or not self.sampler.batch_known(next_step):
                return
            ids = self.sampler.batch(next_step).chunk(self.cfg.grad_accum)[0]
        ids = ids[self.rank :: self.world]
        if self.prefetcher is None:
            self.prefetcher = TeacherPrefetcher(self.device)
        rows = self.source_rows(ids, next_step, next_step / self.total_steps)
        self.prefetcher.submit(next_step, ids, rows, lambda: self.passes.live_teacher(rows))

    def close(self) -> None:
        """End the teacher's prefetch thread, if one runs (it waits for a pass under way)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients at every backward; only the last micro-batch's is needed."""
        if last or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.student)

    def gather_stats(
        self, terms: SampleTerms, per_sample: torch.Tensor, generated: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample statistics (and ``loss``) of the whole micro-batch, in its order, on the CPU.

        With several processes each holds every ``world``-th sample; one all-gather gives every
        process the whole micro-batch, so all scorers see what a single process would.
        """
        columns = {**vars(terms), "generated": generated.to(per_sample.device), "loss": per_sample}
        local = torch.stack([v.detach().float().reshape(-1) for v in columns.values()], dim=1)
        if self.world > 1:
            gathered = self.accelerator.gather(local)  # [world · n, k], process-major
            local = gathered.view(self.world, -1, local.shape[1]).transpose(0, 1).reshape(-1, local.shape[1])
        local = local.cpu()
        return {key: local[:, j].contiguous() for j, key in enumerate(columns)}

    def nonfinite(self, step: int, sample_ids: torch.Tensor, what: str) -> None:
        """A NaN/inf loss or gradient: stop with an error, or (``on_nonfinite: skip``) drop the update."""
        ids = [int(i) for i in sample_ids]
        if self.cfg.on_nonfinite == "stop":
            last = self.checkpoints.last if self.checkpoints else None
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise KdError(
                f"non-finite {what} at step {step + 1} (sample ids {ids}); {where}. Lower training.lr, "
                "or set training.on_nonfinite: skip to drop such batches' updates (docs/resume.md)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, skipped or not
        self.history.skipped_steps.append(step + 1)
        self.on_log({"step": step + 1, "skipped": f"non-finite {what}", "sample_ids": ids})
        return None

    @torch.no_grad()
    def source_rows(self, sample_ids: torch.Tensor, step: int, progress: float) -> SourceRows:
        """The source's rows for ``sample_ids``; the time spent generating is recorded."""
        clock = GenerationClock()  # shared by every copy of the request the source makes
        request = BatchRequest(
            sample_ids,
            dataset_rows(
                self.train.input_ids[sample_ids],
                self.train.attention_mask[sample_ids],
                None if self.train.labels is None else self.train.labels[sample_ids],
            ),
            None if self.train.prompt_lengths is None else self.train.prompt_lengths[sample_ids],
            step,
            self.cfg.seed,
            progress,
            self.unwrapped_student(),
            self.teacher,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            clock=clock,
        )
        rows = self.strategies.source.rows(request)
        self.history.generation_seconds += clock.seconds
        return rows

    def needs_teacher(self, lam: torch.Tensor) -> bool:
        """The teacher runs when a sample of the micro-batch leans on it or the scorer needs the KD term."""
        has_teacher = self.teacher is not None or self.teacher_cache is not None
        return has_teacher and (bool((lam > 0).any()) or "kd" in self.strategies.scorer.needs)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: Path | None = None, *, exits_after_stop: bool = False) -> RunSummary:
        """Train to ``total_steps``; ``resume``: a checkpoint directory to continue from.

        ``exits_after_stop``: the process ends when a signal stops the run, so later signals are
        ignored rather than allowed to interrupt its shutdown (see :class:`GracefulStop`).

        Returns the training numbers of the run's summary (the run adds the teacher, timing and names).
        """
        set_seed(self.cfg.seed, device_specific=True)  # seed + process index: own dropout masks per process
        if resume is not None:  # strategies first: a scorer with restored scores skips its prepare() pass
            self.load_state_dict(read_state(resume))
        self.strategies.scorer.prepare(self.scorer_context())
        if resume is not None:  # weights, optimizer, scheduler, RNG last: the RNG continues as saved
            self.accelerator.load_state(str(resume))
            self.checkpoints.resumed_from(resume, self.step, self.accelerator.is_main_process)
        else:
            self.history.eval_curve = [(0, self.evaluate())]
            self.history.onpolicy_kl = [(0, self.evaluate_on_policy())]
        eval_every = self.cfg.eval_every or max(1, self.total_steps // 4)
        self.student.train()
        self._window_start = time.perf_counter() - self.history.window_seconds
        with (
            GracefulStop(self.checkpoints is not None, hold_after_stop=exits_after_stop) as stop,
            contextlib.closing(self),  # the teacher's prefetch thread ends with the loop, however it ends
        ):
            for step in range(self.step, self.total_steps):
                if self.sampler.needs_refresh(step):
                    self.refresh(step)
                metrics = self.train_step(step)
                done = self.step = step + 1
                self.add_to_window(metrics)
                if done % self.cfg.log_every == 0 or done == self.total_steps:
                    self.log_window(done)
                if done % eval_every == 0 or done == self.total_steps:
                    with self.paused():  # eval time is not training time
                        ppl = self.evaluate()
                    self.history.eval_curve.append((done, ppl))
                    self.on_log({"step": done, "eval_ppl": ppl})
                signum = stop.requested(self.accelerator)
                if self.checkpoints is not None and (signum or self.checkpoints.due(done)):
                    with self.paused():
                        self.save_checkpoint()
                if signum:
                    raise RunInterrupted(
                        done, signum, self.checkpoints.run_dir, self.accelerator.is_main_process
                    )
            # a signal during the last step, after its check: the loop is over, but the stop still counts
            signum = stop.requested(self.accelerator)
            if signum and self.checkpoints is not None:
                if self.checkpoints.last_step != self.step:
                    with self.paused():
                        self.save_checkpoint()
                raise RunInterrupted(
                    self.step, signum, self.checkpoints.run_dir, self.accelerator.is_main_process
                )
        with self.paused():
            self.history.onpolicy_kl.append((self.total_steps, self.evaluate_on_policy()))
        history = self.history
        history.open_share_last = self.sampler.open_count(self.total_steps - 1) / len(self.train)
        return RunSummary(
            student_eval_ppl=history.eval_curve[-1][1],
            student_initial_eval_ppl=history.eval_curve[0][1],
            steps=self.total_steps,
            tokens_per_second=history.tokens / max(history.train_seconds, 1e-9),
            train_tokens=history.tokens,
            mean_lambda=history.lambda_sum / max(history.lambda_count, 1),
            final_open_share=history.open_share_last,
            eval_curve=history.eval_curve,
            onpolicy_kl=history.onpolicy_kl[-1][1],
            onpolicy_kl_initial=history.onpolicy_kl[0][1],
            generation_share=history.generation_seconds / max(history.train_seconds, 1e-9),
        )

    def add_to_window(self, metrics: Mapping[str, Any] | None) -> None:
        if metrics is None:  # a skipped step adds nothing to the averages
            return
        for key, value in metrics.items():
            self.history.window[key] = self.history.window.get(key, 0.0) + value
        self.history.window_steps += 1

    def log_window(self, done: int) -> None:
        """One metrics record: the means over the steps since the last one."""
        history, elapsed = self.history, time.perf_counter() - self._window_start
        running, steps = history.window, history.window_steps
        history.window, history.window_steps, history.window_seconds = {}, 0, 0.0
        self._window_start = time.perf_counter()
        history.train_seconds += elapsed
        if steps == 0:
            return
        tokens = float(running.pop("tokens"))
        history.lambda_sum += float(running["lambda"])
        history.lambda_count += steps
        history.tokens += tokens
        record = {"step": done, **{k: float(v) / steps for k, v in running.items()}}
        record.update(
            open_share=self.sampler.open_count(done - 1) / len(self.train),
            lr=self.scheduler.get_last_lr()[0],
            tokens_per_second=tokens / max(elapsed, 1e-9),
        )
        self.on_log(record)
        self.on_progress(done, record)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the training time (eval, checkpoints)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - start

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        self.history.window_seconds = time.perf_counter() - self._window_start
        return self.checkpoints.save(self.accelerator, self.state_dict(), self.step, self.layout)

    def state_dict(self) -> dict[str, Any]:
        """The loop's state; weights, optimizer, scheduler and RNG are accelerate's ``save_state``."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "strategies": {kind: strategy.state_dict() for kind, strategy in self.strategies.by_kind.items()},
            "history": dict(vars(self.history)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        for kind, strategy in self.strategies.by_kind.items():
            strategy.load_state_dict(state["strategies"].get(kind, {}))
        self.history = History(**state["history"])

    def refresh(self, step: int) -> None:
        """Re-sort the curriculum from the scorer's current scores and record them."""
        self.sampler.refresh(self.strategies.scorer.scores(), step)
        progress = step / self.total_steps
        lam = self.strategies.reliance.weights(self.sampler.ranks, self.sampler.scores, progress)
        self.history.difficulty.append(
            {
                "step": step,
                "scores": self.sampler.scores.clone(),
                "ranks": self.sampler.ranks.clone(),
                "lambda": lam,
            }
        )

    # -- passes over a whole dataset, shared by the processes ---------------------------------------
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Eval perplexity of ``model`` (default the student); every process scores its even share."""
        model = model if model is not None else self.accelerator.unwrap_model(self.student)
        if self.world == 1:
            return perplexity(model, self.eval_set)
        # the same number of forwards on every process (FSDP gathers parameters in each); one all-reduce
        total, count = nll_totals(model, parallel.even_shard(self.eval_set, self.rank, self.world))
        sums = self.accelerator.reduce(torch.stack([total, count]).to(self.device), "sum").cpu()
        return math.exp(sums[0].item() / max(sums[1].item(), 1.0))

    def evaluate_on_policy(self) -> float | None:
        """The teacher's mean reverse KL on the student's greedy continuations of held-out prompts
        (:mod:`kdcore.training.onpolicy_eval`); None without a teacher model or with ``prompts: 0``."""
        cfg = self.cfg.onpolicy_eval
        if self.teacher is None or cfg.prompts == 0:
            return None
        held_out = self.eval_set.head(cfg.prompts)
        lengths = prompt_lengths(held_out.attention_mask, held_out.prompt_lengths, cfg.prompt_tokens)
        mine = (lengths >= 1).nonzero().squeeze(1)[self.rank :: self.world]  # this process's prompts
        total, count = on_policy_kl_totals(
            self.unwrapped_student(),
            self.teacher,
            held_out.input_ids[mine],
            lengths[mine],
            max_new_tokens=cfg.max_new_tokens,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
        )
        if self.world > 1:
            sums = self.accelerator.reduce(torch.stack([total, count]).to(self.device), "sum").cpu()
            total, count = sums[0], sums[1]
        return float(total / count.clamp(min=1.0))

    def unwrapped_student(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def sample_stats(self, model: torch.nn.Module, data: PackedDataset) -> dict[str, torch.Tensor]:
        """Per-sample statistics of ``data`` (a scorer's pre-pass), each process scoring its even share."""
        if self.world == 1:
            return sample_stats(model, data)
        local = sample_stats(model, parallel.even_shard(data, self.rank, self.world))
        stacked = torch.stack(list(local.values()), dim=1).to(self.device)
        rows = parallel.in_sample_order(self.accelerator.gather(stacked).cpu(), self.world, len(data))
        return {key: rows[:, j].contiguous() for j, key in enumerate(local)}

    # -- the teacher and the saved student --------------------------------------------------------
    def place_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The teacher on every process (``replicated``) or split over them with FSDP2 (``sharded``)."""
        if self.cfg.teacher_placement == "replicated":
            return teacher.to(self.device).eval().requires_grad_(False)
        parallel.check_placement(self.cfg.teacher_placement)
        plugin = self.accelerator.state.fsdp_plugin
        return parallel.shard_for_inference(teacher, set(plugin.transformer_cls_names_to_wrap or ()))

    def full_student(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """The student's model object and its full weights; every process must call it (FSDP gathers).

        The weights are complete on the main process (other processes may get nothing); save with
        ``model.save_pretrained(dir, state_dict=weights)``: under FSDP the model itself holds shards.
        """
        weights = self.accelerator.get_state_dict(self.student) or {}  # DeepSpeed: None off the main process
        model = self.accelerator.unwrap_model(self.student)
        # A tied parameter (the LM head sharing the embedding) is saved once, as from an unsharded
        # model; gathered weights are separate copies, which save_pretrained would write twice.
        unique = {name for name, _ in model.named_parameters()}
        aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
        return model, {name: value for name, value in weights.items() if name not in aliases}
