"""kd-plugin-loss-trend: a kdcore difficulty scorer from how a sample's loss moves over training.

The ``loss-trend`` scorer calls a sample hard when the student is *not learning it*: its loss
has fallen little (or risen) since the student first saw it.

For every sample it keeps, from the per-sample cross-entropy ``stats["ce"]`` that the training
step passes to :meth:`~kdcore.DifficultyScorer.observe`:

- the **reference**: the mean loss of the sample's first ``early`` sightings (``early: 1``, the
  default, is simply the first loss seen);
- the **latest** loss seen.

The score is ``latest − reference`` (``mode: diff``, default) or ``latest / reference``
(``mode: ratio``). Higher = harder: a sample whose loss went from 4.0 to 1.0 scores −3.0 (or
0.25), one stuck at 4.0 scores 0.0 (or 1.0). A sample is ``NaN`` (unknown) until it has been seen
``early + 1`` times, i.e. until there is a latest loss that is not part of its reference. In a
typical run every sample is seen once per epoch, so with ``early: 1`` scores exist from the
second epoch's re-sort on; in the first two epochs the curriculum treats them as unknown.

Losses that are not measurements are ignored: non-finite ones (NaN/inf) and those of a sample
with no valid token (``stats["tokens"] == 0``, for which kdcore reports ``ce = 0``). They neither
change the reference nor the latest loss, nor count as a sighting.

This package depends on kdcore only through its public API (``kdcore.__all__``) and never imports
torch at module level, so ``kd --help`` and ``kd list-plugins`` stay fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdcore import DifficultyScorer, KdError, ScorerContext, hookimpl

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"
__all__ = ["LossTrend", "LossTrendParams", "kd_register_scorers"]


class LossTrendParams(BaseModel):
    """Parameters of ``loss-trend`` (``--scorer-arg mode=ratio`` or YAML ``params: {mode: ratio}``)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["diff", "ratio"] = Field(
        "diff",
        description="diff: latest − reference loss; ratio: latest / reference loss",
    )
    early: int = Field(
        1,
        ge=1,
        le=1000,
        description="the reference is the mean loss of a sample's first `early` sightings; "
        "its score is NaN until it has been seen early + 1 times",
    )


class LossTrend(DifficultyScorer):
    """How little a sample's loss fell since the student first saw it (not learning = hard)."""

    Params = LossTrendParams
    #: ``ce`` is always in the statistics; nothing extra (such as a teacher pass) is needed.
    needs = frozenset()

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._ref_sum: torch.Tensor | None = None  # [N] float64, sum of the first `early` losses
        self._latest: torch.Tensor | None = None  # [N] float64, NaN until seen
        self._seen: torch.Tensor | None = None  # [N] int64, finite observations counted

    # -- the scorer interface ------------------------------------------------------------------
    def prepare(self, ctx: ScorerContext) -> None:
        """Allocate per-sample state; keeps state restored by :meth:`load_state_dict` (resume)."""
        import torch

        n = int(ctx.num_samples)
        if self._seen is not None:
            _check_size(int(self._seen.numel()), n)
            return
        self._ref_sum = torch.zeros(n, dtype=torch.float64)
        self._latest = torch.full((n,), float("nan"), dtype=torch.float64)
        self._seen = torch.zeros(n, dtype=torch.int64)

    def observe(self, sample_ids: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> None:
        """Fold one micro-batch of losses in, in batch order, without a Python loop over samples.

        A sample id that appears k times in one call gets exactly what k one-sample calls would give.
        """
        import torch

        if self._seen is None or self._ref_sum is None or self._latest is None:
            raise RuntimeError("scorer 'loss-trend': observe() called before prepare()")
        ids = torch.as_tensor(sample_ids).reshape(-1).to("cpu", torch.int64)
        loss = torch.as_tensor(stats["ce"]).detach().reshape(-1).to("cpu", torch.float64)
        if ids.shape != loss.shape:
            raise ValueError(f"scorer 'loss-trend': {ids.numel()} sample ids but {loss.numel()} losses")
        keep = torch.isfinite(loss)
        if "tokens" in stats:  # a sample with no valid token reports ce = 0: not a measurement
            keep &= torch.as_tensor(stats["tokens"]).reshape(-1).to("cpu") > 0
        ids, loss = ids[keep], loss[keep]
        if ids.numel() == 0:
            return

        uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        # occurrence index of each element within its sample id (0 for the first), in batch order
        order = torch.argsort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        occurrence = torch.empty_like(inverse)
        occurrence[order] = torch.arange(ids.numel()) - starts[inverse[order]]

        sighting = self._seen[ids] + occurrence  # 0-based sighting number over the whole run
        early = sighting < self.params.early
        self._ref_sum.index_add_(0, ids[early], loss[early])
        last = occurrence == counts[inverse] - 1  # one element per unique id: its latest loss
        self._latest[ids[last]] = loss[last]
        self._seen[uniq] += counts

    def scores(self) -> torch.Tensor:
        """``latest − reference`` (or ``latest / reference``) per sample, float32, NaN if unknown."""
        import torch

        if self._seen is None or self._ref_sum is None or self._latest is None:
            raise RuntimeError("scorer 'loss-trend': scores() called before prepare()")
        early = int(self.params.early)
        reference = self._ref_sum / self._seen.clamp(min=1, max=early).to(torch.float64)
        if self.params.mode == "diff":
            score = self._latest - reference
        else:
            score = self._latest / reference.clamp(min=torch.finfo(torch.float64).tiny)
        known = self._seen > early
        return torch.where(known, score, torch.full_like(score, float("nan"))).to(torch.float32)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._seen is None or self._ref_sum is None or self._latest is None:
            return {}
        return {
            "reference_sum": self._ref_sum.clone(),
            "latest": self._latest.clone(),
            "seen_count": self._seen.clone(),
            "early": int(self.params.early),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        if not state:
            return
        if int(state.get("early", self.params.early)) != self.params.early:
            raise KdError(
                f"scorer 'loss-trend': the checkpoint was made with early={state['early']} but this run "
                f"has early={self.params.early}; resume with the same parameters"
            )
        ref = torch.as_tensor(state["reference_sum"]).to("cpu", torch.float64).reshape(-1).clone()
        latest = torch.as_tensor(state["latest"]).to("cpu", torch.float64).reshape(-1).clone()
        seen = torch.as_tensor(state["seen_count"]).to("cpu", torch.int64).reshape(-1).clone()
        if not (ref.shape == latest.shape == seen.shape):
            raise KdError("scorer 'loss-trend': corrupt state (reference_sum, latest and seen_count differ)")
        if self._seen is not None:
            _check_size(int(seen.numel()), int(self._seen.numel()))
        self._ref_sum, self._latest, self._seen = ref, latest, seen

    @property
    def seen_count(self) -> torch.Tensor:
        """How many finite losses each sample has had, shape ``[N]``."""
        if self._seen is None:
            raise RuntimeError("scorer 'loss-trend': not prepared")
        return self._seen.clone()


def _check_size(saved: int, dataset: int) -> None:
    if saved != dataset:
        raise KdError(
            f"scorer 'loss-trend': the saved state covers {saved} samples but the dataset has {dataset}; "
            "the checkpoint belongs to another dataset"
        )


@hookimpl
def kd_register_scorers(register):
    register("loss-trend", LossTrend)
