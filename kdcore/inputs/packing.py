"""Packed samples: fixed-length token rows with stable ids, and the causal-LM labels.

Corpora are tokenised without special tokens, joined with the EOS token and cut into consecutive
``seq_len`` chunks; the last partial chunk is padded and masked. A sample's id is its row index,
stable for the same text, tokenizer and ``seq_len``; :attr:`PackedDataset.fingerprint` identifies
the tokenised data (for caches of teacher outputs, and for resuming).

Causal-LM convention: the logits at position t predict token t + 1, see :func:`shift_labels`;
positions that count nowhere are labelled :data:`IGNORE_INDEX`. Chat and instruction data
(:mod:`kdcore.inputs.chat`) has one sample per conversation and its own ``labels``: the token where it
is a target (an assistant or completion token), :data:`IGNORE_INDEX` elsewhere, so that CE, KD, the
teacher cache and the eval perplexity count only what the model should learn to say.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdcore.errors import KdError
from kdcore.inputs.tokenization import encode_texts, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Label value marking positions that count nowhere (padding, the last position, prompt tokens...).
IGNORE_INDEX = -100


def fingerprint_of(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> str:
    """16 hex characters of sha256 over the shape, token ids, mask and labels if any (as little-endian int64)."""
    digest = hashlib.sha256(f"{tuple(input_ids.shape)}".encode())
    for tensor in (input_ids, attention_mask) if labels is None else (input_ids, attention_mask, labels):
        digest.update(np.ascontiguousarray(tensor.cpu().numpy(), dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


@dataclass
class PackedDataset:
    """Fixed-length samples; sample id == row index.

    ``fingerprint`` is computed from ``input_ids``, ``attention_mask`` and ``labels`` when left empty.
    ``labels`` (chat data) are unshifted targets, :data:`IGNORE_INDEX` where a token is not one; None
    means every real token is a target. ``prompt_lengths`` (chat data) is, per sample, the number of
    tokens before its first target token: the prompt an on-policy student would continue.
    """

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long, 1 = real token
    levels: torch.Tensor | None = None  # [N] long, known difficulty (demo corpus only)
    fingerprint: str = ""
    labels: torch.Tensor | None = None  # [N, L] long, unshifted; None: every real token
    prompt_lengths: torch.Tensor | None = None  # [N] int64

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be [N, L]"
            )
        n = len(self.input_ids)
        if self.levels is not None and self.levels.shape != (n,):
            raise ValueError(f"levels {tuple(self.levels.shape)} must be [{n}]")
        if self.labels is not None and self.labels.shape != self.input_ids.shape:
            raise ValueError(f"labels {tuple(self.labels.shape)} must be {tuple(self.input_ids.shape)}")
        if self.prompt_lengths is not None and self.prompt_lengths.shape != (n,):
            raise ValueError(f"prompt_lengths {tuple(self.prompt_lengths.shape)} must be [{n}]")
        if not self.fingerprint:
            self.fingerprint = fingerprint_of(self.input_ids, self.attention_mask, self.labels)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def lengths(self) -> torch.Tensor:
        """Valid (unmasked) tokens per sample, ``[N]`` long."""
        return self.attention_mask.sum(dim=1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample as a dict (for a ``DataLoader``): ``sample_id``, ``input_ids``, ``attention_mask``,
        and ``level``, ``labels`` and ``prompt_length`` when the dataset has them."""
        item = {
            "sample_id": int(index),
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
        }
        if self.levels is not None:
            item["level"] = int(self.levels[index])
        if self.labels is not None:
            item["labels"] = self.labels[index]
        if self.prompt_lengths is not None:
            item["prompt_length"] = int(self.prompt_lengths[index])
        return item

    def subset(self, index: slice | torch.Tensor) -> PackedDataset:
        """The samples ``index`` selects (a slice or sample ids), renumbered from 0, with their own fingerprint."""

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index].clone()

        return PackedDataset(
            pick(self.input_ids),
            pick(self.attention_mask),
            pick(self.levels),
            labels=pick(self.labels),
            prompt_lengths=pick(self.prompt_lengths),
        )

    def head(self, n: int | None) -> PackedDataset:
        """The first ``n`` samples (all when ``n`` is None or large), with their own fingerprint."""
        if n is None or n >= len(self):
            return self
        return self.subset(slice(0, n))

    def batch(
        self, index: slice | torch.Tensor, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and next-token labels (:func:`shift_labels`) of the samples
        ``index`` selects, on ``device``: what every pass over the data feeds a model and a loss."""
        ids = self.input_ids[index].to(device)
        mask = self.attention_mask[index].to(device)
        labels = None if self.labels is None else self.labels[index].to(device)
        return ids, mask, shift_labels(ids, mask, labels)


def shift_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token targets aligned with the full logits ``[B, L]``.

    Position ``t`` predicts ``input_ids[:, t + 1]`` (``labels[:, t + 1]`` when a dataset has its own
    unshifted labels, which are :data:`IGNORE_INDEX` on tokens that are no target); the last position
    and padded targets are :data:`IGNORE_INDEX`. Passing the full (contiguous) logits with these labels
    avoids copying a ``[:, :-1]`` slice.
    """
    shifted = torch.full_like(input_ids, IGNORE_INDEX)
    shifted[:, :-1] = (input_ids if labels is None else labels)[:, 1:]
    shifted[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return shifted


def pack(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    levels: Sequence[int] | None = None,
    per_document: bool = False,
) -> PackedDataset:
    """Tokenise ``texts`` into ``[N, seq_len]`` samples.

    Default (corpora): non-empty documents are joined with the EOS token into one stream, cut into
    consecutive ``seq_len`` chunks; the last partial chunk is padded and masked, and dropped when it
    holds fewer than 2 tokens (nothing to predict). ``per_document=True``: each text is exactly one
    sample, truncated or padded to ``seq_len``, and ``levels`` (one per text) are kept.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if levels is not None and not per_document:
        raise ValueError("levels are per text; pass per_document=True")
    pad = pad_id(tokenizer)
    encoded = encode_texts(texts, tokenizer)

    if per_document:
        if levels is not None and len(levels) != len(texts):
            raise ValueError(f"{len(levels)} levels for {len(texts)} texts")
        ids = np.full((len(encoded), seq_len), pad, dtype=np.int64)
        mask = np.zeros((len(encoded), seq_len), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            tokens = tokens[:seq_len]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        level_tensor = None if levels is None else torch.tensor(list(levels), dtype=torch.long)
        return PackedDataset(torch.from_numpy(ids), torch.from_numpy(mask), level_tensor)

    eos = tokenizer.eos_token_id
    separator = np.asarray([] if eos is None else [eos], dtype=np.int64)
    docs = [tokens for tokens in encoded if len(tokens)]
    pieces = list(itertools.chain.from_iterable((separator, d) for d in docs))[1:]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_full, rest = divmod(len(stream), seq_len)
    n_rows = n_full + (rest >= 2)
    if n_rows == 0:
        raise KdError(
            f"the text holds {len(stream)} token(s), too few for one sample; pass more text or a smaller seq_len"
        )
    ids = np.full(n_rows * seq_len, pad, dtype=np.int64)
    mask = np.zeros(n_rows * seq_len, dtype=np.int64)
    used = min(len(stream), n_rows * seq_len)
    ids[:used] = stream[:used]
    mask[:used] = 1
    return PackedDataset(
        torch.from_numpy(ids.reshape(n_rows, seq_len)), torch.from_numpy(mask.reshape(n_rows, seq_len))
    )
