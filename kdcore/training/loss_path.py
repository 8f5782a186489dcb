"""The run's loss path, decided once, and the forward passes of a training step on it.

The terms come one of two ways (:func:`choose_loss_path`): the *fused* path asks both models for their
final hidden states and projects them through the LM heads chunk by chunk inside the loss
(:func:`~kdcore.training.fused_loss.fused_sample_terms`), so no ``[tokens, vocab]`` logits tensor of
either model exists; the *logits* path takes the models' logits (or a teacher cache's top-K) to
:func:`~kdcore.training.onpolicy_loss.source_terms`. Both give the same numbers on dataset rows; rows a
source writes during training take the logits path. :class:`LossPath` runs the student and the teacher
(or reads the teacher cache) for a micro-batch on the path chosen, for :class:`~kdcore.training.engine.Trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from kdcore.errors import KdError
from kdcore.strategies import Divergence, SourceRows
from kdcore.training.fused_loss import final_hidden_states, fusable, fused_sample_terms, linear_head
from kdcore.training.losses import SampleTerms, TopKTeacher
from kdcore.training.onpolicy_loss import source_terms

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["CachedTeacher", "LossPath", "choose_loss_path"]


class CachedTeacher(Protocol):
    """A teacher known from disk instead of a model (:class:`kdcore.teachers.cache.TeacherCache`)."""

    def topk(self, sample_ids: torch.Tensor, labels: torch.Tensor) -> TopKTeacher:
        """The teacher's top-K log-probabilities at a micro-batch's labelled positions (``labels`` as
        :func:`~kdcore.inputs.packing.shift_labels` makes them)."""

    def stats(self) -> dict[str, torch.Tensor]:
        """Per-sample ``ce``, ``confidence`` and ``entropy`` of the teacher (what scorers ask for)."""


def choose_loss_path(
    setting: str,
    student: Any,
    teacher: Any | None,
    cached: bool,
    *,
    sharded: bool = False,
    generates: bool = False,
) -> tuple[str, str]:
    """``("fused" | "logits", why)`` for a run, decided once from ``training.loss_path`` (``setting``).

    ``auto`` is fused when the student's and the live teacher's logits are a plain linear head over
    their final hidden states; with a teacher ``cached`` only the student's head matters (the cache's
    top-K rows stand for the teacher, ``fused_sample_terms(teacher_topk=...)``). A ``sharded`` run
    (FSDP, DeepSpeed, or a sharded teacher) splits the heads over the processes, so it takes the logits
    path, as does a source that ``generates`` rows (their loss and the scorer's statistics come from
    :func:`~kdcore.training.onpolicy_loss.source_terms`). ``fused`` where that cannot work is refused
    with one sentence.
    """
    if setting == "logits":
        return "logits", "training.loss_path is logits"
    problem = None
    if sharded:
        problem = "the run shards its models over the processes (FSDP or DeepSpeed), so a head is split"
    elif generates:
        problem = "the source writes text during training, whose loss the logits path computes"
    elif not fusable(student):
        problem = "the student's logits are not a plain linear head over its final hidden states"
    elif teacher is not None and not cached and not fusable(teacher):
        problem = "the teacher's logits are not a plain linear head over its final hidden states"
    if problem is None and cached:
        return "fused", (
            "the student's head is linear: its logits are computed chunk by chunk inside the loss, "
            "against the teacher cache's top-K"
        )
    if problem is None:
        return "fused", "both heads are linear: logits are computed chunk by chunk inside the loss"
    if setting == "fused":
        raise KdError(f"training.loss_path is fused but {problem}; set training.loss_path to auto or logits")
    return "logits", problem


class LossPath:
    """The forward passes of a micro-batch on the run's loss path: the student (prepared by accelerate),
    the teacher (placed) or the teacher cache, and the terms the step learns from and the scorer observes."""

    def __init__(
        self,
        loss_path: tuple[str, str],
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        teacher_cache: CachedTeacher | None,
        divergence: Divergence,
        accelerator: Accelerator,
    ) -> None:
        self.loss_path, self.reason = loss_path  # "fused" | "logits", and why (choose_loss_path)
        self.student, self.teacher, self.teacher_cache = student, teacher, teacher_cache
        self.divergence = divergence
        self.accelerator = accelerator
        self.device = accelerator.device

    def live_teacher(self, rows: SourceRows) -> Any:
        """The live teacher's output for ``rows`` as :meth:`forward` takes it: the fused path's keyword
        arguments of :func:`fused_sample_terms`, or the logits."""
        input_ids, mask = rows.input_ids.to(self.device), rows.attention_mask.to(self.device)
        if self.loss_path == "fused":
            return self.teacher_hidden(input_ids, mask)
        return self.teacher_logits(None, None, input_ids, mask)

    def forward(
        self,
        rows: SourceRows,
        sample_ids: torch.Tensor,
        lam: torch.Tensor,
        temperature: float,
        with_teacher: bool,
        teacher_out: Any = None,
    ) -> tuple[SampleTerms, SampleTerms]:
        """The loss terms of ``rows`` and the terms the scorer observes (:mod:`kdcore.training.onpolicy_loss`).

        ``lam``: λ of each row, the weights the fused path prepares its gradients for. ``teacher_out``:
        the live teacher's output for ``rows`` already computed (:meth:`live_teacher`), else None.
        """
        input_ids, mask = rows.input_ids.to(self.device), rows.attention_mask.to(self.device)
        labels = rows.labels.to(self.device)
        divergence = self.divergence
        if (
            self.loss_path == "fused"
        ):  # dataset rows only (choose_loss_path): what is learnt is what is observed
            hidden = final_hidden_states(self.student, input_ids, mask)
            weight, bias = linear_head(self.accelerator.unwrap_model(self.student))
            teacher = {}
            if with_teacher:
                teacher = teacher_out or self.fused_teacher(sample_ids, labels, input_ids, mask)
            with self.accelerator.autocast():  # mixed precision: the head projections in its dtype
                terms = fused_sample_terms(
                    hidden,
                    weight,
                    labels,
                    divergence=divergence,
                    temperature=temperature,
                    student_bias=bias,
                    loss_weights=(1 - lam, lam),
                    **teacher,
                )
            return terms, terms
        student_logits = self.student(input_ids=input_ids, attention_mask=mask).logits
        # the teacher scores the exact ids and mask the student saw
        teacher_logits = None
        if with_teacher:
            teacher_logits = teacher_out
            if teacher_logits is None:
                teacher_logits = self.teacher_logits(sample_ids, labels, input_ids, mask)
        prompt_labels = None if rows.prompt_labels is None else rows.prompt_labels.to(self.device)
        return source_terms(
            student_logits,
            labels,
            teacher_logits,
            divergence,
            temperature,
            generated=rows.generated,
            prompt_labels=prompt_labels,
        )

    @torch.no_grad()
    def teacher_logits(
        self, sample_ids: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | TopKTeacher:
        """The teacher's logits for a micro-batch: a live forward pass, or the cache's top-K."""
        if self.teacher_cache is not None:
            return self.teacher_cache.topk(sample_ids, labels)
        with self.accelerator.autocast():  # mixed precision: the teacher in its dtype too
            return self.teacher(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    @torch.no_grad()
    def fused_teacher(
        self, sample_ids: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, Any]:
        """The fused path's teacher side, the keyword arguments of :func:`fused_sample_terms`: the cache's
        top-K rows, or the live teacher's final hidden states and head, without gradient."""
        if self.teacher_cache is not None:
            return {"teacher_topk": self.teacher_cache.topk(sample_ids, labels)}
        return self.teacher_hidden(input_ids, mask)

    @torch.no_grad()
    def teacher_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The fused path's live teacher side: its final hidden states and head, without gradient."""
        weight, bias = linear_head(self.teacher)
        with self.accelerator.autocast():
            hidden = final_hidden_states(self.teacher, input_ids, mask)
        return {"teacher_hidden": hidden, "teacher_head": weight, "teacher_bias": bias}
