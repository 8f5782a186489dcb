"""Tokenizers: the built-in specs (byte, BPE trained on the corpus) and encoding text without special tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcore.errors import KdError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOKENIZER_FORMS = "'byte' or 'bpe:vocab_size=N' (optionally ',min_frequency=M', default 2)"


def _parse_params(spec: str, text: str) -> dict[str, str]:
    params = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise KdError(f"tokenizer spec '{spec}' is malformed; use {_TOKENIZER_FORMS}")
        params[key.strip()] = value.strip()
    return params


def build_tokenizer(spec: str | None, train_texts: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """A tokenizer from a spec: ``"byte"`` (also for ``None``) or ``"bpe:vocab_size=N[,min_frequency=M]"``.

    ``byte`` is ``ByT5Tokenizer(extra_ids=0)``: 259 ids, pad 0, eos 1, unk 2, byte ``b`` -> ``b + 3``.
    ``bpe`` trains a byte-level BPE (special tokens ``<pad>`` = 0, ``<eos>`` = 1) on ``train_texts``
    with the ``tokenizers`` library, deterministically, and wraps it as a
    ``PreTrainedTokenizerFast`` that round-trips through ``save_pretrained``/``AutoTokenizer``.
    """
    spec = "byte" if spec is None else spec.strip()
    if spec == "byte":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)
    kind, _, rest = spec.partition(":")
    if kind.strip() != "bpe":
        raise KdError(f"unknown tokenizer spec '{spec}'; use {_TOKENIZER_FORMS}")
    params = _parse_params(spec, rest)
    unknown = sorted(set(params) - {"vocab_size", "min_frequency"})
    if unknown or "vocab_size" not in params:
        problem = f"unknown key '{unknown[0]}'" if unknown else "vocab_size is missing"
        raise KdError(f"tokenizer spec '{spec}': {problem}; use {_TOKENIZER_FORMS}")
    try:
        vocab_size = int(params["vocab_size"])
        min_frequency = int(params.get("min_frequency", 2))
    except ValueError:
        raise KdError(f"tokenizer spec '{spec}' needs integer values; use {_TOKENIZER_FORMS}") from None
    if vocab_size < 259 or min_frequency < 1:
        raise KdError(
            f"tokenizer spec '{spec}' needs vocab_size >= 259 (256 bytes, 2 special tokens, 1 merge) "
            f"and min_frequency >= 1; use {_TOKENIZER_FORMS}"
        )
    texts = [t for t in train_texts if t]
    if not texts:
        raise KdError(f"tokenizer spec '{spec}' needs training text, but the training split is empty")
    return _train_bpe(texts, vocab_size, min_frequency)


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", clean_up_tokenization_spaces=False
    )


def _byte_offset(tokenizer: Any) -> int | None:
    """The id offset when ``tokenizer`` is a plain byte tokenizer (ByT5), else None."""
    from transformers import ByT5Tokenizer

    if isinstance(tokenizer, ByT5Tokenizer):
        return int(getattr(tokenizer, "offset", 3))
    return None


def encode_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
    """Token ids (int64 arrays) per text, without special tokens.

    Text is text: a literal ``"</s>"``, ``"<eos>"`` or ``"<unk>"`` in it (WikiText has ``<unk>``)
    is tokenised like any other string, never mapped to a special id (``split_special_tokens``).
    The byte tokenizer takes a fast path, UTF-8 bytes + offset 3, equal to
    ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)``.
    """
    offset = _byte_offset(tokenizer)
    if offset is not None:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) + offset for t in texts]
    if not texts:
        return []
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        split_special_tokens=True,
        return_attention_mask=False,
        verbose=False,
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads samples: the pad token, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
