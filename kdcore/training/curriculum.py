"""The curriculum sampler: orders training samples by difficulty and opens them by a pacing function.

At every refresh (step 0, then every ``refresh_every`` steps: by default each epoch or each tenth of
training, whichever comes first, so that runs shorter than an epoch still re-sort) the engine hands the sampler the scorer's
current scores; the sampler sorts the samples easy → hard (hard → easy with ``reverse``) and
computes each sample's difficulty percentile (``ranks``) for the reliance policy. At each step
the pacing function says which share of that ordering is open, and the batch is drawn from it.

Rules:

- **Ties** are broken by a per-sample random key drawn once from the seed (not by sample id), so
  equal scores do not favour low ids; the key is fixed for the run, so tied samples keep their
  relative order from one refresh to the next.
- **Unknown difficulty** (``NaN`` score). When *every* score is unknown (``scores`` is ``None``,
  i.e. no scorer, or the first epoch of a student snapshot) the ordering is the random key order:
  a seeded permutation that stays the same across refreshes, so with a pacing but no scorer the
  open set is a growing random subset. When only *some* are unknown, the known samples are sorted
  and the unknown ones (in key order) are put at uniformly random positions, drawn from
  ``(seed, refresh step)``: an unknown sample is as likely to be in the open share as a random
  known one, and is neither favoured nor starved.
- **Ranks**: the percentile of each sample among the *known* scores, ``0`` = easiest, ``1`` =
  hardest, tied scores sharing their average rank (a single known score, or all tied, gives 0.5);
  ``NaN`` for unknown samples. ``reverse`` changes the order of presentation, not the ranks.
- **Batches** are stateless given the ordering: while only part of the ordering is open, the
  batch at ``step`` is ``batch_size`` ids drawn uniformly without replacement from the open
  prefix, with a generator seeded from ``(seed, step)``. Once everything is open, batches are
  plain shuffled epochs: epoch ``e = step // steps_per_epoch`` walks one permutation seeded from
  ``(seed, e)`` and every sample appears once; when ``batch_size`` does not divide the dataset,
  the epoch's last batch is topped up with the first ids of the same permutation, so every batch
  has exactly ``batch_size`` ids and no id twice (as long as ``batch_size ≤ num_samples``).
  Resuming therefore needs only the ordering (:meth:`CurriculumSampler.state_dict`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from kdcore.errors import KdError
from kdcore.strategies import PacingFunction

__all__ = ["CurriculumSampler", "derive_seed", "difficulty_ranks"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes and Python versions."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*parts))
    return gen


def difficulty_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Percentile in ``[0, 1]`` of each score among the known (non-NaN) ones; float64, NaN if unknown.

    Ties share their average rank; with a single known score (or all tied) the rank is 0.5.
    """
    scores = scores.to(torch.float64)
    ranks = torch.full(scores.shape, math.nan, dtype=torch.float64)
    known = ~torch.isnan(scores)
    m = int(known.sum())
    if m == 0:
        return ranks
    if m == 1:
        ranks[known] = 0.5
        return ranks
    _, inverse, counts = torch.unique(scores[known], sorted=True, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    average = starts.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    ranks[known] = average[inverse] / (m - 1)
    return ranks


class CurriculumSampler:
    """Orders samples easy-to-hard by difficulty and draws batches from the open share."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        pacing: PacingFunction,
        total_steps: int,
        seed: int,
        reverse: bool = False,
        refresh_every: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise KdError(f"the curriculum needs at least one training sample, got {num_samples}")
        if batch_size < 1:
            raise KdError(f"batch size must be at least 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.pacing = pacing
        self.total_steps = int(total_steps)
        self.seed = int(seed)
        self.reverse = bool(reverse)
        self.steps_per_epoch = math.ceil(self.num_samples / self.batch_size)
        auto = min(self.steps_per_epoch, math.ceil(max(self.total_steps, 1) / 10))
        self.refresh_every = max(1, int(refresh_every or auto))
        # key[i]: sample i's random tie-break position, fixed for the run
        self._key = torch.randperm(self.num_samples, generator=_generator("tie-key", self.seed))
        self._by_key = torch.argsort(self._key)
        self.ordering: torch.Tensor = self._by_key.clone()
        self.scores: torch.Tensor = torch.full((self.num_samples,), math.nan, dtype=torch.float32)
        self.ranks: torch.Tensor = torch.full((self.num_samples,), math.nan, dtype=torch.float32)
        self.last_refresh: int | None = None
        self._epoch_perm: tuple[int, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------------
    # ordering

    def needs_refresh(self, step: int) -> bool:
        """Whether the engine should call :meth:`refresh` before drawing the batch at ``step``."""
        if self.last_refresh is None:
            return True
        return step % self.refresh_every == 0 and step != self.last_refresh

    def refresh(self, scores: torch.Tensor | None, step: int) -> None:
        """Re-sort by ``scores`` (``[num_samples]``, NaN = unknown; ``None`` = no scorer)."""
        n = self.num_samples
        if scores is None:
            s = torch.full((n,), math.nan, dtype=torch.float64)
        else:
            s = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
            if s.shape != (n,):
                raise KdError(
                    f"the scorer gave {s.numel()} scores but the dataset has {n} samples; "
                    "the scores belong to another dataset"
                )
        known = ~torch.isnan(s)
        known_by_key = self._by_key[known[self._by_key]]
        unknown_by_key = self._by_key[~known[self._by_key]]
        # stable sort of the key-ordered samples: ties keep their random key order
        easy_to_hard = known_by_key[torch.sort(s[known_by_key], stable=True).indices]
        known_order = easy_to_hard.flip(0) if self.reverse else easy_to_hard
        u = unknown_by_key.numel()
        if u == 0:
            ordering = known_order
        elif u == n:
            ordering = unknown_by_key
        else:
            slots = torch.randperm(n, generator=_generator("unknown-slots", self.seed, step))[:u]
            is_unknown = torch.zeros(n, dtype=torch.bool)
            is_unknown[slots] = True
            ordering = torch.empty(n, dtype=torch.long)
            ordering[is_unknown] = unknown_by_key
            ordering[~is_unknown] = known_order
        self.ordering = ordering
        self.ranks = difficulty_ranks(s).to(torch.float32)
        self.scores = s.to(torch.float32)
        self.last_refresh = int(step)

    def batch_known(self, step: int) -> bool:
        """Whether :meth:`batch` at ``step`` is fixed already, before the steps in between are trained: no
        re-sort is due before it (a re-sort uses the scores observed meanwhile), or every sample is open
        at it (then the batch is the epoch's permutation, whatever the ordering)."""
        return not self.needs_refresh(step) or self.open_count(step) >= self.num_samples

    def difficulty(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank, score)`` of ``sample_ids`` as of the last refresh: the reliance policy's inputs."""
        ids = sample_ids.to("cpu", torch.long)
        return self.ranks[ids], self.scores[ids]

    # ---------------------------------------------------------------------------------------
    # batches

    def open_count(self, step: int) -> int:
        """How many samples at the head of the ordering are open at ``step``."""
        fraction = float(self.pacing.fraction(step, self.total_steps))
        if not (0.0 < fraction <= 1.0):
            raise KdError(
                f"pacing {type(self.pacing).__name__} returned {fraction} at step {step}; a pacing "
                "function must return a share in (0, 1] (a bug in that plugin)"
            )
        # rounding first keeps 0.2 · 10 = 2.0000000000000004 at 2 samples
        wanted = math.ceil(round(fraction * self.num_samples, 6))
        return min(self.num_samples, max(self.batch_size, wanted, 1))

    def batch(self, step: int) -> torch.Tensor:
        """The ``[batch_size]`` sample ids (int64) to train on at ``step``."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        n, b = self.num_samples, self.batch_size
        k = self.open_count(step)
        if k >= n:
            epoch, j = divmod(step, self.steps_per_epoch)
            positions = (j * b + torch.arange(b)) % n
            return self._permutation(epoch)[positions]
        picks = torch.randperm(k, generator=_generator("batch", self.seed, step))[:b]
        return self.ordering[picks].clone()

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_perm is None or self._epoch_perm[0] != epoch:
            perm = torch.randperm(self.num_samples, generator=_generator("epoch", self.seed, epoch))
            self._epoch_perm = (epoch, perm)
        return self._epoch_perm[1]

    # ---------------------------------------------------------------------------------------
    # resume

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to draw the same batches after a restart."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "reverse": self.reverse,
            "ordering": self.ordering.clone(),
            "ranks": self.ranks.clone(),
            "scores": self.scores.clone(),
            "last_refresh": self.last_refresh,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if int(state["num_samples"]) != self.num_samples:
            raise KdError(
                f"the checkpoint's curriculum covers {state['num_samples']} samples but the dataset "
                f"has {self.num_samples}; resume with the same data"
            )
        ordering = torch.as_tensor(state["ordering"]).to(torch.long)
        if ordering.shape != (self.num_samples,):
            raise KdError("the checkpoint's curriculum ordering is corrupt (wrong length)")
        self.ordering = ordering.clone()
        self.ranks = torch.as_tensor(state["ranks"]).to(torch.float32).clone()
        self.scores = torch.as_tensor(state["scores"]).to(torch.float32).clone()
        last = state.get("last_refresh")
        self.last_refresh = None if last is None else int(last)
