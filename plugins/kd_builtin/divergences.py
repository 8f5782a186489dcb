"""Divergences between the teacher's and the student's token distributions.

Every divergence receives log-probabilities already softened by the temperature, shape
``[tokens, vocab]``, and returns one value per token, shape ``[tokens]``; kdcore applies the τ²
factor, the padding mask and the per-sample mean (see :mod:`kdcore.training.losses`).

Mixtures such as ``β·P_T + (1−β)·P_S`` are formed in log space with ``logaddexp`` (a two-term
logsumexp), so nothing underflows when a probability is tiny.

``jsd`` is the plain β-generalised Jensen–Shannon divergence,
``JSD_β = β·KL(P_T‖M) + (1−β)·KL(P_S‖M)`` with ``M = β·P_T + (1−β)·P_S``, continuous in β over the
whole of ``[0, 1]``. At the end points the mixture collapses onto one distribution and the value is
exactly 0 (β = 0: M = P_S and the teacher term has weight 0; β = 1: M = P_T). Near the ends it
vanishes linearly: ``JSD_β ≈ β·KL(P_T‖P_S)`` as β → 0 and ``≈ (1−β)·KL(P_S‖P_T)`` as β → 1.
This differs on purpose from TRL's GKD ``generalized_jsd_loss``, which special-cases β = 0 as
forward KL and β = 1 as reverse KL while using the mixture formula in between, so its loss jumps
from ~0 to a full KL at the end points. Here ``jsd`` never switches formula; use ``forward-kl`` or
``reverse-kl`` for those. (TRL's loss also has no τ² factor; kdcore applies one to every divergence.)

Torch is imported inside the methods only: ``kd list-plugins`` loads this module without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from kdcore import Divergence, hookimpl

if TYPE_CHECKING:
    import torch


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w·p + (1−w)·q), elementwise and stable; exact at w = 0 and w = 1."""
    import torch

    if weight <= 0.0:
        return logq
    if weight >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight), logq + math.log1p(-weight))


class ForwardKL(Divergence):
    """KL(P_T ‖ P_S): the classic distillation loss (mode-covering)."""

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        return _kl(teacher_logp, student_logp)


class ReverseKL(Divergence):
    """KL(P_S ‖ P_T): reverse KL, mode-seeking (MiniLLM-style)."""

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        return _kl(student_logp, teacher_logp)


class JSDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="teacher weight β in the mixture M = β·P_T + (1−β)·P_S; 0.5 is the symmetric JSD; "
        "β = 0 and β = 1 give exactly 0",
    )


class GeneralizedJSD(Divergence):
    """β-generalised Jensen–Shannon: β·KL(P_T‖M) + (1−β)·KL(P_S‖M), M = β·P_T + (1−β)·P_S."""

    Params = JSDParams

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        beta = float(self.params.beta)
        log_m = _log_mixture(teacher_logp, student_logp, beta)
        # The multiplications by 0 at the end points keep the graph connected and give exactly 0.
        return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


class SkewParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="skew α in [0, 1): weight of the first distribution in the mixture; 0 gives the plain KL",
    )


class SkewKL(Divergence):
    """Skew KL (DistiLLM): KL(P_T ‖ α·P_T + (1−α)·P_S)."""

    Params = SkewParams

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        alpha = float(self.params.alpha)
        return _kl(teacher_logp, _log_mixture(teacher_logp, student_logp, alpha))


class SkewReverseKL(Divergence):
    """Skew reverse KL (DistiLLM): KL(P_S ‖ α·P_S + (1−α)·P_T)."""

    Params = SkewParams

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        alpha = float(self.params.alpha)
        return _kl(student_logp, _log_mixture(student_logp, teacher_logp, alpha))


class TotalVariation(Divergence):
    """Total variation distance: ½·Σ|P_T − P_S|."""

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


@hookimpl
def kd_register_divergences(register):
    register("forward-kl", ForwardKL)
    register("reverse-kl", ReverseKL)
    register("jsd", GeneralizedJSD)
    register("skew-kl", SkewKL)
    register("skew-reverse-kl", SkewReverseKL)
    register("tvd", TotalVariation)
