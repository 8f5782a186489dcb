"""Divergences between the teacher's and the student's token distributions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcore import Divergence, hookimpl

if TYPE_CHECKING:
    import torch


class ForwardKL(Divergence):
    """KL(P_T ‖ P_S): the classic distillation loss (mode-covering)."""

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


@hookimpl
def kd_register_divergences(register):
    register("forward-kl", ForwardKL)
