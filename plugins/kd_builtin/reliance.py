"""Reliance policies: how much each sample leans on the teacher (λ) rather than the labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from kdcore import ReliancePolicy, hookimpl

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

        return torch.full(rank.shape, self.params.value, dtype=torch.float32)


class NoReliance(ReliancePolicy):
    """λ = 0: the student learns from the labels only (the CE baseline)."""

    def weights(self, rank: torch.Tensor, score: torch.Tensor, progress: float) -> torch.Tensor:
        import torch

        return torch.zeros(rank.shape, dtype=torch.float32)


@hookimpl
def kd_register_reliances(register):
    register("fixed", Fixed)
    register("none", NoReliance)
