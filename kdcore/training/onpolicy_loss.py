"""Per-sample terms of a batch that mixes dataset rows and generated rows.

Every row's loss is ``(1 − λ)·CE + λ·KD`` over the targets it trains on (its ``labels``), with one change:
a row whose targets the **student** wrote (on-policy) has no label, so it drops the CE term and its loss is
``λ·KD``, where ``KD = τ² · mean over the counted generated tokens (EOS included) of D(P_T^τ ‖ P_S^τ)``.
λ keeps one meaning everywhere, the weight of the teacher term; the ``(1 − λ)`` share of an unlabelled row
is dropped, not moved onto the divergence (λ = 0 makes such a row count nowhere). A row the **teacher**
wrote (sequence-level KD) is labelled: its CE is on the teacher's tokens.

The loss terms come from one :func:`~kdcore.training.losses.per_sample_terms` call over each row's labels (for a
generated row: its generated tokens only, ``IGNORE_INDEX`` on the prompt and after the first EOS). What the
difficulty scorer observes is the same, except on generated rows: there ``ce`` and ``confidence`` are taken on
the prompt's gold tokens (the only dataset text the row holds; free from the same logits, no gradient), so
that they keep their meaning, "the student on this sample's gold text"; ``kd`` and ``tokens`` stay those of
the loss. With no generated row both are ``per_sample_terms``' own result, bit for bit.
"""

from __future__ import annotations

import torch

from kdcore.strategies import Divergence
from kdcore.training.losses import SampleTerms, TopKTeacher, per_sample_terms

__all__ = ["sample_losses", "source_terms"]


def source_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher | None,
    divergence: Divergence | None,
    temperature: float,
    *,
    generated: torch.Tensor | None = None,
    prompt_labels: torch.Tensor | None = None,
    chunk_tokens: int | None = 2048,
) -> tuple[SampleTerms, SampleTerms]:
    """``(loss terms, observed terms)`` per row; see the module docstring.

    ``labels`` ``[B, T]``: each row's next-token targets (gold text, or its generated tokens).
    ``generated`` ``[B]`` bool marks rows whose continuation was generated; ``prompt_labels`` ``[B, T]``
    holds the gold next tokens inside those rows' prompts (``IGNORE_INDEX`` elsewhere). Both may be
    ``None`` when no row is generated.
    """
    terms = per_sample_terms(student_logits, labels, teacher_logits, divergence, temperature, chunk_tokens)
    if generated is None or not bool(generated.any()):
        return terms, terms
    if prompt_labels is None:
        raise ValueError("source_terms: prompt_labels are required when some row is generated")
    generated = generated.to(terms.ce.device, torch.bool)
    with torch.no_grad():
        prompt = per_sample_terms(student_logits.detach(), prompt_labels, chunk_tokens=chunk_tokens)
    observed = SampleTerms(
        ce=torch.where(generated, prompt.ce.to(terms.ce.dtype), terms.ce.detach()),
        kd=terms.kd.detach(),
        confidence=torch.where(generated, prompt.confidence.to(terms.confidence.dtype), terms.confidence),
        tokens=terms.tokens,
    )
    return terms, observed


def sample_losses(
    terms: SampleTerms, lam: torch.Tensor, labelled: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row loss ``[B]``: ``(1 − λ)·CE + λ·KD``, and ``λ·KD`` on rows that are not ``labelled``."""
    lam = lam.to(terms.ce.device)
    ce_weight = 1 - lam
    if labelled is not None:
        ce_weight = ce_weight.masked_fill(~labelled.to(lam.device, torch.bool), 0.0)
    return ce_weight * terms.ce + lam * terms.kd
