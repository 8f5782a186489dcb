"""Helpers for a plugin's own tests: build what kdcore hands a strategy, without a run.

:func:`source_request` is kdcore's own :class:`~kdcore.strategies.SourceRequest` (the one the engine
builds for every micro-batch) over rows a test gives, so ``generate``, ``coin``, ``prompts`` and
``with_rows`` behave exactly as in training: a test of a source needs no fake of its own, only a
small model (any ``transformers`` causal LM) when the source generates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcore.strategies import SourceRequest

__all__ = ["source_request"]


def source_request(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    student: Any = None,
    teacher: Any = None,
    prompt_lengths: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    step: int = 0,
    seed: int = 0,
    progress: float = 0.0,
    pad_id: int = 0,
    eos_ids: Sequence[int] = (),
) -> SourceRequest:
    """The request for samples whose dataset rows are ``input_ids`` ``[b, W]`` (left-justified;
    ``attention_mask`` defaults to all ones), with gold next-token labels as packing gives them.

    ``student``/``teacher``: the models a source may continue prompts with; ``prompt_lengths`` ``[b]``:
    a chat dataset's prompts (None: plain text); ``sample_ids`` default to ``0..b-1``; ``pad_id`` pads
    continuations and ``eos_ids`` end them.
    """
    from kdcore.training.sources import BatchRequest, dataset_rows

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    ids = torch.arange(len(input_ids)) if sample_ids is None else sample_ids
    return BatchRequest(
        ids,
        dataset_rows(input_ids, mask),
        prompt_lengths,
        step,
        seed,
        progress,
        student,
        teacher,
        pad_id=pad_id,
        eos_ids=tuple(eos_ids),
    )
