"""Reliance policies: how much each sample leans on the teacher (λ) rather than the labels.

A policy receives, per sample of the batch, ``rank`` (difficulty percentile in ``[0, 1]``,
0 = easiest), ``score`` (the scorer's raw difficulty) and the training ``progress`` in ``[0, 1]``,
and returns λ per sample as a float32 tensor of ``rank``'s shape. The loss is
``(1 − λ)·CE + λ·KD``.

Unknown difficulty: a sample with ``NaN`` rank (no score yet: the first epoch of a student
snapshot, or no scorer at all) gets the policy's *mean* λ over a uniformly distributed rank,
unless the policy's ``lambda_unknown`` parameter sets it explicitly:

- ``fixed``/``none``/``staged`` (replace): ignore difficulty, so unknown samples get the same λ.
- ``threshold``: ``(1 − quantile)·lambda_hard + quantile·lambda_easy`` (with ``invert`` and ``on:
  score``, ``quantile·lambda_hard + (1 − quantile)·lambda_easy``).
- ``continuous``: ``lambda_min + (lambda_max − lambda_min)·mean(f)`` with ``mean(f)`` the mean
  of the mapping over ``r ∈ [0, 1]``, computed in closed form (linear ½, power 1/(exponent+1),
  sigmoid from its integral, the softplus).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdcore import PluginError, ReliancePolicy, create_strategy, hookimpl

if TYPE_CHECKING:
    import torch


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = Field(0.5, ge=0, le=1, description="λ for every sample (the CLI's --lambda)")


class Fixed(ReliancePolicy):
    """Vanilla KD: the same λ for every sample (--lambda)."""

    Params = FixedParams

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        return torch.full(rank.shape, self.params.value, dtype=torch.float32, device=rank.device)


class NoReliance(ReliancePolicy):
    """λ = 0: the student learns from the labels only (the CE baseline)."""

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        return torch.zeros(rank.shape, dtype=torch.float32, device=rank.device)


def _lambda_field(default: float, what: str) -> Any:
    return Field(default, ge=0, le=1, description=what)


def _invert_field() -> Any:
    return Field(
        False,
        description="hand the teacher to the other end: read each difficulty upside down (rank r as 1 − r), "
        "so the easy samples get the λ the hard ones would (the reversed-reliance control)",
    )


def _unknown_field() -> Any:
    return Field(
        None,
        ge=0,
        le=1,
        description="λ for samples with no score yet; null: the policy's mean λ over a uniform rank",
    )


# --------------------------------------------------------------------------------------------
# threshold
# --------------------------------------------------------------------------------------------


class ThresholdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quantile: float = Field(0.5, ge=0, le=1, description="rank at and above which a sample counts as hard")
    lambda_hard: float = _lambda_field(0.9, "λ for hard samples")
    lambda_easy: float = _lambda_field(0.1, "λ for easy samples")
    on: Literal["rank", "score"] = Field(
        "rank", description="threshold the difficulty percentile (rank) or the raw score"
    )
    score_threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="with on=score: raw score at and above which a sample counts as hard",
    )
    invert: bool = _invert_field()
    lambda_unknown: float | None = _unknown_field()

    @model_validator(mode="after")
    def _need_threshold(self) -> ThresholdParams:
        if self.on == "score" and self.score_threshold is None:
            raise ValueError("score_threshold: required when on is 'score' (the raw-score cut-off)")
        return self


class Threshold(ReliancePolicy):
    """Two levels: lambda_hard for samples at or above the quantile (or a raw-score cut), else lambda_easy.

    Unknown samples (NaN rank, or NaN score with ``on: score``) get ``lambda_unknown`` or, by
    default, the mean over a uniform rank: ``(1 − quantile)·lambda_hard + quantile·lambda_easy``.
    With ``on: score`` the ``quantile`` is used only for that default, as the assumed share of
    samples below ``score_threshold``.

    ``invert``: the rank is read as ``1 − rank``, so samples at or *below* rank ``1 − quantile``
    get lambda_hard: the same share of samples gets each λ (and the default unknown λ is the same),
    at the easy end. With ``on: score``, samples at or below ``score_threshold`` get lambda_hard,
    and the assumed share below it (``quantile``) now gets lambda_hard.
    """

    Params = ThresholdParams

    def hard_share(self) -> float:
        """The share of samples (over a uniform rank, or as assumed with ``on: score``) that get lambda_hard."""
        p = self.params
        return p.quantile if p.invert and p.on == "score" else 1 - p.quantile

    def unknown_lambda(self) -> float:
        p = self.params
        if p.lambda_unknown is not None:
            return p.lambda_unknown
        return self.hard_share() * p.lambda_hard + (1 - self.hard_share()) * p.lambda_easy

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        p = self.params
        if p.on == "score":
            if score is None:
                raise ValueError("reliance 'threshold' with on: score needs the raw scores")
            value = torch.as_tensor(score, device=rank.device).reshape(rank.shape).to(torch.float64)
            cut = p.score_threshold
            if p.invert:  # at or below the cut is "hard"
                value, cut = -value, -cut
        else:
            value, cut = rank.to(torch.float64), p.quantile
            if p.invert:
                value = 1 - value
        hard = torch.tensor(p.lambda_hard, dtype=torch.float32, device=rank.device)
        easy = torch.tensor(p.lambda_easy, dtype=torch.float32, device=rank.device)
        lam = torch.where(value >= cut, hard, easy)
        return torch.where(torch.isnan(value), self.unknown_lambda(), lam).to(torch.float32)


# --------------------------------------------------------------------------------------------
# continuous
# --------------------------------------------------------------------------------------------


class ContinuousParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lambda_min: float = _lambda_field(0.1, "λ of the easiest sample (rank 0)")
    lambda_max: float = _lambda_field(0.9, "λ of the hardest sample (rank 1)")
    mapping: Literal["linear", "sigmoid", "power"] = Field(
        "linear", description="shape f of the rank → λ curve, with f(0) = 0 and f(1) = 1"
    )
    centre: float = Field(0.5, ge=0, le=1, description="sigmoid: the rank at the curve's midpoint")
    sharpness: float = Field(
        10.0, ge=0.1, le=1000, description="sigmoid: steepness (slope at the centre ≈ sharpness/4)"
    )
    exponent: float = Field(2.0, gt=0, le=100, description="power: f(r) = r^exponent")
    invert: bool = _invert_field()
    lambda_unknown: float | None = _unknown_field()


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class Continuous(ReliancePolicy):
    """Smooth: λ = lambda_min + (lambda_max − lambda_min)·f(rank), f linear, sigmoid or power.

    ``linear``: f(r) = r. ``power``: f(r) = r^exponent. ``sigmoid``: σ(sharpness·(r − centre))
    rescaled so that f(0) = 0 and f(1) = 1. Unknown samples (NaN rank) get ``lambda_unknown`` or,
    by default, ``lambda_min + (lambda_max − lambda_min)·∫₀¹ f(r) dr`` (½ for linear,
    1/(exponent + 1) for power, the softplus integral for sigmoid).

    ``invert``: λ = lambda_min + (lambda_max − lambda_min)·f(1 − rank): the easiest sample gets
    lambda_max, the hardest lambda_min, and the λ values (so the mean λ and the unknown default)
    are those of the policy without it, mirrored over the ranks.
    """

    Params = ContinuousParams

    def _sigmoid_ends(self) -> tuple[float, float]:
        s, c = self.params.sharpness, self.params.centre
        return _sigmoid(-s * c), _sigmoid(s * (1 - c))

    def mean_f(self) -> float:
        """``∫₀¹ f(r) dr``: the mean of the mapping over a uniform rank."""
        mapping = self.params.mapping
        if mapping == "linear":
            return 0.5
        if mapping == "power":
            return 1.0 / (self.params.exponent + 1.0)
        s, c = self.params.sharpness, self.params.centre
        lo, hi = self._sigmoid_ends()
        integral = (_softplus(s * (1 - c)) - _softplus(-s * c)) / s  # ∫₀¹ σ(s(r − c)) dr
        return (integral - lo) / (hi - lo)

    def unknown_lambda(self) -> float:
        p = self.params
        if p.lambda_unknown is not None:
            return p.lambda_unknown
        return p.lambda_min + (p.lambda_max - p.lambda_min) * self.mean_f()

    def f(self, rank: torch.Tensor) -> torch.Tensor:
        """The mapping on ranks (float64, clamped to ``[0, 1]``; NaN stays NaN)."""
        import torch

        r = rank.to(torch.float64).clamp(0.0, 1.0)
        mapping = self.params.mapping
        if mapping == "linear":
            return r
        if mapping == "power":
            return r.pow(self.params.exponent)
        lo, hi = self._sigmoid_ends()
        s, c = self.params.sharpness, self.params.centre
        return ((torch.sigmoid(s * (r - c)) - lo) / (hi - lo)).clamp(0.0, 1.0)

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        p = self.params
        lam = p.lambda_min + (p.lambda_max - p.lambda_min) * self.f(1 - rank if p.invert else rank)
        return torch.where(torch.isnan(lam), self.unknown_lambda(), lam).to(torch.float32)


# --------------------------------------------------------------------------------------------
# staged (POCL)
# --------------------------------------------------------------------------------------------


class StagedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lambdas: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.7, 0.8, 0.9, 1.0],
        min_length=1,
        description="λ of each stage, stages splitting training progress into equal parts",
    )
    temperatures: list[Annotated[float, Field(gt=0, le=100)]] | None = Field(
        default_factory=lambda: [1.0, 1.33, 1.67, 2.0],
        description="distillation temperature of each stage (same length as lambdas); null keeps the base τ",
    )
    combine: Literal["replace", "multiply"] = Field(
        "replace",
        description="replace: λ is the stage's λ; multiply: stage λ × the inner policy's λ",
    )
    inner: str | None = Field(
        None, description="with combine=multiply: name of the reliance policy that sees difficulty"
    )
    inner_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the inner policy")

    @model_validator(mode="after")
    def _check(self) -> StagedParams:
        if self.temperatures is not None and len(self.temperatures) != len(self.lambdas):
            raise ValueError(
                f"temperatures: {len(self.temperatures)} given for {len(self.lambdas)} stages "
                "(one per entry of lambdas, or null to keep the base temperature)"
            )
        if self.combine == "multiply" and not self.inner:
            raise ValueError("inner: required when combine is 'multiply' (e.g. inner: continuous)")
        if self.combine == "replace" and (self.inner or self.inner_params):
            raise ValueError("inner: only used with combine: multiply (it would be ignored)")
        return self


class Staged(ReliancePolicy):
    """POCL-style stages: λ (and τ) step up with training progress; ignores difficulty unless combined.

    Training progress is split into ``k = len(lambdas)`` equal stages; stage
    ``min(k − 1, ⌊progress·k⌋)`` sets λ = ``lambdas[stage]`` and, unless ``temperatures`` is
    null, the distillation temperature ``temperatures[stage]`` (absolute, replacing the base τ).
    With ``combine: replace`` (default) every sample of the batch gets the same λ, so unknown
    difficulty (NaN rank) changes nothing. With ``combine: multiply`` λ = stage λ × the ``inner``
    policy's λ, which is built from the registry when this policy is built (so a bad name or
    parameter fails at start-up) and decides the unknown-difficulty λ; the inner policy's own
    temperature is not used.
    """

    Params = StagedParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._inner: ReliancePolicy | None = None
        if self.params.combine == "multiply":
            try:
                inner = create_strategy("reliance", self.params.inner, self.params.inner_params)
            except PluginError as exc:
                raise PluginError(f"reliance 'staged', inner policy: {exc}") from None
            assert isinstance(inner, ReliancePolicy)
            self._inner = inner

    def stage(self, progress: float) -> int:
        k = len(self.params.lambdas)
        progress = min(1.0, max(0.0, float(progress)))
        return min(k - 1, math.floor(progress * k))

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        lam = self.params.lambdas[self.stage(progress)]
        if self._inner is None:
            return torch.full(rank.shape, lam, dtype=torch.float32, device=rank.device)
        inner = self._inner.weights(rank, score, progress).to(torch.float32)
        return (lam * inner).reshape(rank.shape)

    def temperature(self, base: float, progress: float) -> float:
        if self.params.temperatures is None:
            return base
        return self.params.temperatures[self.stage(progress)]

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self._inner.state_dict()} if self._inner is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._inner is not None and "inner" in state:
            self._inner.load_state_dict(state["inner"])


@hookimpl
def kd_register_reliances(register):
    register("fixed", Fixed)
    register("none", NoReliance)
    register("threshold", Threshold)
    register("continuous", Continuous)
    register("staged", Staged)
