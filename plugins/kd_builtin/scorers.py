"""Difficulty scorers: which training samples are hard (higher score = harder).

``scores()`` returns one float per sample id; ``NaN`` means "difficulty unknown". The sampler
puts unknown samples in random order and the reliance policy gives them its "unknown difficulty"
λ, so NaN is the honest answer for a sample the scorer has no measurement of.

Cold start (what the scores are before training has seen a sample):

- ``student-snapshot`` with ``warmup: random`` (default): every sample starts at NaN. The first
  epoch therefore runs in random order, and each sample gets a score the first time a training
  step sees it. No pass over the data is spent on scoring.
- ``student-snapshot`` with ``warmup: scan``: ``prepare()`` runs one no-grad student pass
  (``ctx.student_stats()``) and every sample starts from that measurement, so the first epoch is
  already ordered. With ``ema > 0`` that scan value is the first value the average blends into.
- ``teacher-student-gap``: like ``warmup: random``: NaN until the sample is first trained on
  (the KD term needs both models on the sample; no pre-pass is defined for it).
- ``teacher-confidence``: all samples scored in ``prepare()`` by one teacher pass; the scores are
  saved to ``<run_dir>/teacher_scores.safetensors`` and reused on resume instead of recomputed.
- ``length`` and ``random``: all samples scored in ``prepare()`` at no model cost.

Resuming: ``state_dict()`` holds every score (and the seen counts). If ``load_state_dict()`` ran
before ``prepare()``, ``prepare()`` keeps the loaded state and does not recompute it (no teacher
or student pass on resume); if it runs after, it overwrites what ``prepare()`` built.

Observations that are not finite (NaN/inf, e.g. a sample with no valid tokens) are ignored: they
neither change a score nor count as a sighting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdcore import DifficultyScorer, KdError, ScorerContext, hookimpl

if TYPE_CHECKING:
    import torch

TEACHER_SCORES_FILE = "teacher_scores.safetensors"


def _as_cpu_float(x: Any) -> torch.Tensor:
    import torch

    return torch.as_tensor(x).detach().to("cpu", torch.float32).reshape(-1).clone()


def _check_length(name: str, tensor: torch.Tensor, num_samples: int) -> None:
    if tensor.shape != (num_samples,):
        raise KdError(
            f"scorer '{name}': got scores of shape {tuple(tensor.shape)} but the dataset has "
            f"{num_samples} samples; the checkpoint or score file belongs to another dataset"
        )


class NoScorer(DifficultyScorer):
    """No difficulty: every sample is unknown (no curriculum, policies use their default λ)."""

    def scores(self) -> torch.Tensor | None:
        return None


# --------------------------------------------------------------------------------------------
# Scorers that track a per-sample statistic reported by the training step
# --------------------------------------------------------------------------------------------


class TrackedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="smoothing β: s ← β·s_old + (1−β)·new; 0 keeps the last value seen",
    )


class _TrackedScorer(DifficultyScorer):
    """Base: keeps a last-value/EMA score and a seen count per sample from one training statistic."""

    Params = TrackedParams
    #: Registry name, used in error messages.
    scorer_name: ClassVar[str] = ""

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._values: torch.Tensor | None = None  # [N] float32, NaN = never measured
        self._seen: torch.Tensor | None = None  # [N] int64, training observations counted

    # -- what subclasses define ------------------------------------------------------------
    def _observed(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The per-sample value of this batch, shape ``[batch]``."""
        raise NotImplementedError

    def _initial(self, ctx: ScorerContext) -> torch.Tensor | None:
        """Scores to start from in :meth:`prepare` (``None``: all unknown)."""
        return None

    # -- the scorer interface --------------------------------------------------------------
    def prepare(self, ctx: ScorerContext) -> None:
        import torch

        n = int(ctx.num_samples)
        if self._values is not None:  # restored by load_state_dict: never recompute on resume
            _check_length(self.scorer_name, self._values, n)
            return
        initial = self._initial(ctx)
        if initial is None:
            self._values = torch.full((n,), float("nan"), dtype=torch.float32)
        else:
            self._values = _as_cpu_float(initial)
            _check_length(self.scorer_name, self._values, n)
        self._seen = torch.zeros(n, dtype=torch.int64)

    def observe(self, sample_ids: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> None:
        if self._values is None or self._seen is None:
            raise RuntimeError(f"scorer '{self.scorer_name}': observe() called before prepare()")
        self._update(sample_ids, self._observed(stats))

    def scores(self) -> torch.Tensor | None:
        if self._values is None:
            raise RuntimeError(f"scorer '{self.scorer_name}': scores() called before prepare()")
        return self._values.clone()

    @property
    def seen_count(self) -> torch.Tensor:
        """How many training observations each sample has had, shape ``[N]``."""
        if self._seen is None:
            raise RuntimeError(f"scorer '{self.scorer_name}': not prepared")
        return self._seen.clone()

    def state_dict(self) -> dict[str, Any]:
        if self._values is None or self._seen is None:
            return {}
        return {"values": self._values.clone(), "seen_count": self._seen.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        if not state:
            return
        values = _as_cpu_float(state["values"])
        seen = torch.as_tensor(state["seen_count"]).to("cpu", torch.int64).reshape(-1).clone()
        if seen.shape != values.shape:
            raise KdError(f"scorer '{self.scorer_name}': corrupt state (values and seen_count differ)")
        if self._values is not None:
            _check_length(self.scorer_name, values, self._values.numel())
        self._values, self._seen = values, seen

    # -- the update ------------------------------------------------------------------------
    def _update(self, sample_ids: torch.Tensor, new: torch.Tensor) -> None:
        """Fold ``new[i]`` into sample ``sample_ids[i]``, in batch order, without a Python loop.

        A sample that appears k times in one call gets exactly what k sequential updates would
        give: s ← β^k·s_old + Σ_j (1−β)·β^(k−1−j)·v_j, where a sample with no value yet takes its
        first v as is (weight β^(k−1) instead of (1−β)·β^(k−1), and no s_old term).
        """
        import torch

        assert self._values is not None and self._seen is not None
        ids = torch.as_tensor(sample_ids).reshape(-1).to("cpu", torch.int64)
        v = torch.as_tensor(new).detach().reshape(-1).to("cpu", torch.float64)
        if ids.shape != v.shape:
            raise ValueError(f"scorer '{self.scorer_name}': {ids.numel()} sample ids but {v.numel()} values")
        keep = torch.isfinite(v)
        ids, v = ids[keep], v[keep]
        if ids.numel() == 0:
            return
        beta = float(self.params.ema)

        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        # occurrence index of each element within its sample id, in batch order
        order = torch.argsort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inverse)
        rank[order] = torch.arange(ids.numel()) - starts[inverse[order]]

        old = self._values[uniq].to(torch.float64)
        had = ~torch.isnan(old)
        decay = torch.pow(beta, (counts[inverse] - 1 - rank).to(torch.float64))  # β^(k-1-j)
        first = (rank == 0) & ~had[inverse]
        weight = decay * torch.where(first, 1.0, 1.0 - beta)
        fresh = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, weight * v)
        carried = torch.pow(beta, counts.to(torch.float64)) * torch.nan_to_num(old, nan=0.0)
        self._values[uniq] = (carried + fresh).to(torch.float32)
        self._seen[uniq] += counts


class SnapshotParams(TrackedParams):
    signal: Literal["loss", "confidence"] = Field(
        "loss",
        description="loss: the student's mean token CE; confidence: 1 − mean gold-token probability",
    )
    warmup: Literal["random", "scan"] = Field(
        "random",
        description="random: unseen samples are unknown (first epoch random); "
        "scan: one student pass in prepare() scores every sample up front",
    )


class StudentSnapshot(_TrackedScorer):
    """The student's own loss (or 1 − confidence) from the last time it trained on each sample."""

    Params = SnapshotParams
    scorer_name = "student-snapshot"

    def _from(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.params.signal == "loss":
            return stats["ce"]
        return 1.0 - stats["confidence"]

    def _observed(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._from(stats)

    def _initial(self, ctx: ScorerContext) -> torch.Tensor | None:
        if self.params.warmup != "scan":
            return None
        return self._from(ctx.student_stats())


class TeacherStudentGap(_TrackedScorer):
    """The per-sample KD term (teacher–student divergence) from training: large gap = hard."""

    needs = frozenset({"kd"})
    scorer_name = "teacher-student-gap"

    def _observed(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "kd" not in stats:
            raise KeyError(f"scorer '{self.scorer_name}' needs the 'kd' statistic in observe()")
        return stats["kd"]


# --------------------------------------------------------------------------------------------
# Scorers fixed in prepare()
# --------------------------------------------------------------------------------------------


class _FixedScorer(DifficultyScorer):
    """Base: scores computed once in :meth:`prepare` and kept for the whole run."""

    scorer_name: ClassVar[str] = ""

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._scores: torch.Tensor | None = None

    def _compute(self, ctx: ScorerContext) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, ctx: ScorerContext) -> None:
        n = int(ctx.num_samples)
        if self._scores is None:
            self._scores = _as_cpu_float(self._compute(ctx))
        _check_length(self.scorer_name, self._scores, n)

    def scores(self) -> torch.Tensor | None:
        if self._scores is None:
            raise RuntimeError(f"scorer '{self.scorer_name}': scores() called before prepare()")
        return self._scores.clone()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._scores is None else {"scores": self._scores.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        scores = _as_cpu_float(state["scores"])
        if self._scores is not None:
            _check_length(self.scorer_name, scores, self._scores.numel())
        self._scores = scores


class TeacherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: Literal["confidence", "entropy", "loss"] = Field(
        "confidence",
        description="confidence: 1 − teacher mean gold-token probability; "
        "entropy: teacher mean predictive entropy; loss: teacher mean token CE",
    )


class TeacherConfidence(_FixedScorer):
    """Teacher uncertainty per sample from one pass before training (cached in the run dir)."""

    Params = TeacherParams
    scorer_name = "teacher-confidence"

    def prepare(self, ctx: ScorerContext) -> None:
        self._from_file = False
        super().prepare(ctx)
        # Keep the file in step with the scores in use (also after a resume from a checkpoint
        # whose run dir lost the file), so that the next resume never needs the teacher pass.
        if ctx.run_dir is not None and not self._from_file:
            run_dir = Path(ctx.run_dir)
            if self._load(run_dir, int(ctx.num_samples)) is None:
                self._save(run_dir)

    def _compute(self, ctx: ScorerContext) -> torch.Tensor:
        if ctx.run_dir is not None:
            cached = self._load(Path(ctx.run_dir), int(ctx.num_samples))
            if cached is not None:
                self._from_file = True
                return cached
        stats = ctx.teacher_stats()
        if self.params.signal == "confidence":
            return 1.0 - stats["confidence"]
        if self.params.signal == "entropy":
            return stats["entropy"]
        return stats["ce"]

    def _load(self, run_dir: Path, num_samples: int) -> torch.Tensor | None:
        """The saved scores if the file exists, is readable, matches the signal and the length."""
        from safetensors import safe_open

        path = run_dir / TEACHER_SCORES_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("signal") != self.params.signal or "scores" not in f.keys():  # noqa: SIM118
                    return None
                scores = f.get_tensor("scores")
        except Exception:  # unreadable or truncated: recompute and overwrite
            return None
        if scores.shape != (num_samples,):
            return None
        return scores

    def _save(self, run_dir: Path) -> None:
        from safetensors.torch import save_file

        assert self._scores is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / TEACHER_SCORES_FILE
        tmp = run_dir / f".{TEACHER_SCORES_FILE}.{os.getpid()}.tmp"
        save_file(
            {"scores": self._scores.contiguous()},
            str(tmp),
            metadata={"scorer": self.scorer_name, "signal": self.params.signal},
        )
        os.replace(tmp, path)


class LengthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invert: bool = Field(False, description="score shorter samples as harder instead of longer ones")


class LengthScorer(_FixedScorer):
    """Share of non-padding tokens in the sample: longer = harder (or shorter, with invert)."""

    Params = LengthParams
    scorer_name = "length"

    def _compute(self, ctx: ScorerContext) -> torch.Tensor:
        import torch

        share = torch.as_tensor(ctx.lengths).to(torch.float32) / float(max(int(ctx.seq_len), 1))
        return 1.0 - share if self.params.invert else share


class RandomParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0, description="combined with the run seed; change it for another ordering")


class RandomScorer(_FixedScorer):
    """A fixed random difficulty per sample (seeded): the control for any curriculum."""

    Params = RandomParams
    scorer_name = "random"

    def _compute(self, ctx: ScorerContext) -> torch.Tensor:
        import numpy as np
        import torch

        # A proper combination of the two seeds (not a sum: (1, 0) and (0, 1) must differ).
        entropy = [int(ctx.seed) & (2**64 - 1), int(self.params.seed)]
        state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        return torch.rand(int(ctx.num_samples), generator=gen, dtype=torch.float32)


@hookimpl
def kd_register_scorers(register):
    register("none", NoScorer)
    register("student-snapshot", StudentSnapshot)
    register("teacher-confidence", TeacherConfidence)
    register("teacher-student-gap", TeacherStudentGap)
    register("length", LengthScorer)
    register("random", RandomScorer)
