"""Difficulty scorers: which training samples are hard (higher score = harder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcore import DifficultyScorer, hookimpl

if TYPE_CHECKING:
    import torch


class NoScorer(DifficultyScorer):
    """No difficulty: every sample is unknown (no curriculum, policies use their default λ)."""

    def scores(self) -> torch.Tensor | None:
        return None


@hookimpl
def kd_register_scorers(register):
    register("none", NoScorer)
