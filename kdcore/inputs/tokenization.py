"""Tokenizers: the built-in specs (byte, BPE trained on the corpus) and encoding text without special tokens.

A fast tokenizer holds some hundred bytes per token while it encodes (token strings, offsets, masks), so
text reaches it in pieces of at most :data:`MAX_CHARS_PER_CALL` characters: one 50 MB row costs what
a quarter-megabyte one does, plus its token ids (:func:`pieces`, :func:`encode_texts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcore.errors import KdError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: the most characters a tokenizer gets in one call (its working memory is ~150-400 bytes a token)
MAX_CHARS_PER_CALL = 1 << 18

_TOKENIZER_FORMS = "'byte' or 'bpe:vocab_size=N' (optionally ',min_frequency=M', default 2)"


def pieces(text: str, size: int | None = None) -> list[str]:
    """``text`` as consecutive pieces of at most ``size`` (default :data:`MAX_CHARS_PER_CALL`) characters (joined, they are ``text``).

    A cut falls just before a space that follows a non-space in the piece's second half when there is
    one, where byte-level BPE starts a new word anyway, so a long row's tokens are nearly always those
    of the whole; a row shorter than ``size`` is one piece, tokenised exactly as before.
    """
    size = size or MAX_CHARS_PER_CALL
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + size // 2, end)
        while cut > start + size // 2 and text[cut - 1].isspace():
            cut = text.rfind(" ", start + size // 2, cut)
        end = cut if cut > start + size // 2 else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


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
    chunks = (piece for text in texts for piece in pieces(text))  # a bounded word, whatever the row
    tok.train_from_iterator(chunks, trainer=trainer, length=len(texts))
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
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        encoded = tokenizer(
            [piece for _, piece in batch],
            add_special_tokens=False,
            split_special_tokens=True,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]
        for (index, _), ids in zip(batch, encoded, strict=True):
            parts[index].append(np.asarray(ids, dtype=np.int64))
        batch.clear()

    for index, text in enumerate(texts):  # batches of at most MAX_CHARS_PER_CALL characters (or one piece)
        for piece in pieces(text):
            if batch and size + len(piece) > MAX_CHARS_PER_CALL:
                flush()
                size = 0
            batch.append((index, piece))
            size += len(piece)
    if batch:
        flush()
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]


def longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token covers: its longest vocabulary entry (1 for bytes).

    ``n`` tokens never cover more than ``n * longest_token`` characters, so text past that can be cut
    before tokenising without changing the first ``n`` tokens.
    """
    if _byte_offset(tokenizer) is not None:
        return 1
    return max(1, max((len(token) for token in tokenizer.get_vocab()), default=1))


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads samples: the pad token, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
