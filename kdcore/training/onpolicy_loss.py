"""Per-sample terms of a batch that mixes dataset rows and on-policy (generated) rows.

A dataset row trains on its gold tokens: ``(1 − λ)·CE + λ·KD``, exactly as in :mod:`kdcore.training.losses`.
A generated row has no gold label on its continuation, so it trains on the divergence alone: its loss is
``λ·KD``, where ``KD = τ² · mean over the counted generated tokens (EOS included) of D(P_T^τ ‖ P_S^τ)``.
λ keeps one meaning everywhere, the weight of the teacher term; a generated row has no label term, so its
``(1 − λ)`` share is dropped, not moved onto the divergence (λ = 0 makes the row count nowhere).

Both kinds go through one :func:`~kdcore.training.losses.per_sample_terms` call: the labels of a generated row are
its generated tokens (``IGNORE_INDEX`` on the prompt and after the first EOS), those of a dataset row its
gold tokens. For the difficulty scorer, a generated row reports ``ce`` and ``confidence`` on its prompt's
gold tokens (the only gold text it holds, free from the same logits, no gradient), ``kd`` on its generated
tokens and ``tokens`` = its generated tokens, the ones its loss covers. With no generated row the result is
``per_sample_terms``' own, bit for bit.
"""

from __future__ import annotations

import torch

from kdcore.strategies import Divergence
from kdcore.training.losses import SampleTerms, TopKTeacher, per_sample_terms

__all__ = ["sample_losses", "source_terms"]


def source_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    generated: torch.Tensor,
    prompt_labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | TopKTeacher | None,
    divergence: Divergence | None,
    temperature: float,
    chunk_tokens: int | None = 2048,
) -> SampleTerms:
    """Per-sample terms for rows that are dataset text (``generated[i]`` False) or on-policy (True).

    ``labels`` ``[B, T]``: gold next tokens of dataset rows, generated next tokens of generated rows
    (:meth:`Generated.labels <kdcore.training.generation.Generated.labels>`). ``prompt_labels`` ``[B, T]``:
    the gold next tokens inside each generated row's prompt (``IGNORE_INDEX`` elsewhere); ``None`` when no
    row is generated. See the module docstring for what each statistic means on a generated row.
    """
    terms = per_sample_terms(student_logits, labels, teacher_logits, divergence, temperature, chunk_tokens)
    generated = generated.to(terms.ce.device, torch.bool)
    if not bool(generated.any()):
        return terms
    if prompt_labels is None:
        raise ValueError("source_terms: prompt_labels are required when some row is generated")
    with torch.no_grad():
        prompt = per_sample_terms(student_logits.detach(), prompt_labels, chunk_tokens=chunk_tokens)
    return SampleTerms(
        ce=torch.where(generated, prompt.ce.to(terms.ce.dtype), terms.ce),
        kd=terms.kd,
        confidence=torch.where(generated, prompt.confidence.to(terms.confidence.dtype), terms.confidence),
        tokens=terms.tokens,
    )


def sample_losses(terms: SampleTerms, lam: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``[B]``: ``(1 − λ)·CE + λ·KD`` for dataset rows, ``λ·KD`` for generated rows."""
    lam = lam.to(terms.ce.device)
    ce_weight = (1 - lam).masked_fill(generated.to(lam.device, torch.bool), 0.0)
    return ce_weight * terms.ce + lam * terms.kd
