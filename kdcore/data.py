"""Datasets: loading text, building a tokenizer, and packing into fixed-length samples.

The engine's path is three calls::

    corpus = load_corpus(cfg.data, seed)                      # texts, split into train / eval
    tokenizer = build_tokenizer("bpe:vocab_size=2000", corpus.train_texts)   # or the model's own
    train, eval_ = corpus.pack(tokenizer, cfg.data.seq_len)   # two PackedDatasets

(:func:`load_splits` does the first and last step when the tokenizer already exists;
:attr:`Corpus.fingerprint` identifies the text before tokenisation, e.g. as a teacher-cache key.)

Sources (``data.dataset``): ``"demo"`` (the generated corpus of :mod:`kdcore.demo`, one sample
per text, with known difficulty levels); a local ``.txt`` (one document per file), ``.jsonl`` /
``.json`` / ``.csv`` / ``.parquet`` file (one document per row of ``data.text_column``) or a
folder of them; or a hub dataset ``name[:config[:split]]``. Everything except the demo corpus is
read through the ``datasets`` library.

Packing: corpora are tokenised without special tokens, joined with the EOS token and cut into
consecutive ``seq_len`` chunks; the last partial chunk is padded and masked. A sample's id is
its row index, stable for the same text, tokenizer and ``seq_len``; :attr:`PackedDataset.fingerprint`
identifies the tokenised data (for caches of teacher outputs, and for resuming).

Causal-LM convention: the logits at position t predict token t + 1, see
:func:`shift_labels`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdcore.errors import KdError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kdcore.config import DataConfig

IGNORE_INDEX = -100
DEMO_EVAL_SEED_OFFSET = 1_000_003
MIN_DEMO_EVAL = 200

#: file suffix -> ``datasets`` builder
SUPPORTED_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SOURCE_HINT = (
    "pass a local .txt/.jsonl/.csv/.parquet file or folder, 'demo', "
    "or a hub dataset name like wikitext:wikitext-2-raw-v1:train"
)
_TOKENIZER_FORMS = "'byte' or 'bpe:vocab_size=N' (optionally ',min_frequency=M', default 2)"


# --------------------------------------------------------------------------- packed samples


def fingerprint_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """16 hex characters of sha256 over the shape, token ids and mask (as little-endian int64)."""
    digest = hashlib.sha256(f"{tuple(input_ids.shape)}".encode())
    for tensor in (input_ids, attention_mask):
        digest.update(np.ascontiguousarray(tensor.cpu().numpy(), dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


@dataclass
class PackedDataset:
    """Fixed-length samples; sample id == row index.

    ``fingerprint`` is computed from ``input_ids`` and ``attention_mask`` when left empty.
    """

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long, 1 = real token
    levels: torch.Tensor | None = None  # [N] long, known difficulty (demo corpus only)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be [N, L]"
            )
        if self.levels is not None and self.levels.shape != (len(self.input_ids),):
            raise ValueError(f"levels {tuple(self.levels.shape)} must be [{len(self.input_ids)}]")
        if not self.fingerprint:
            self.fingerprint = fingerprint_of(self.input_ids, self.attention_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def lengths(self) -> torch.Tensor:
        """Valid (unmasked) tokens per sample, ``[N]`` long."""
        return self.attention_mask.sum(dim=1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample as a dict (for a ``DataLoader``): ``sample_id``, ``input_ids``, ``attention_mask``."""
        item = {
            "sample_id": int(index),
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
        }
        if self.levels is not None:
            item["level"] = int(self.levels[index])
        return item

    def head(self, n: int | None) -> PackedDataset:
        """The first ``n`` samples (all when ``n`` is None or large), with their own fingerprint."""
        if n is None or n >= len(self):
            return self
        levels = None if self.levels is None else self.levels[:n].clone()
        return PackedDataset(self.input_ids[:n].clone(), self.attention_mask[:n].clone(), levels)


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the full logits ``[B, L]``.

    Position ``t`` predicts ``input_ids[:, t + 1]``; the last position and padded targets are ``-100``.
    Passing the full (contiguous) logits with these labels avoids copying a ``[:, :-1]`` slice.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


# --------------------------------------------------------------------------- tokenizers


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


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# --------------------------------------------------------------------------- packing


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
    pad = _pad_id(tokenizer)
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


# --------------------------------------------------------------------------- loading text


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars off (restored afterwards)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _column_texts(ds: Any, source: str, text_column: str) -> list[str]:
    if text_column not in ds.column_names:
        available = ", ".join(ds.column_names) or "none"
        raise KdError(
            f"dataset '{source}' has no column '{text_column}' (available: {available}); "
            "set data.text_column to one of them"
        )
    texts = []
    for value in ds[text_column]:
        if value is None:
            continue
        if not isinstance(value, str):
            raise KdError(
                f"column '{text_column}' of dataset '{source}' holds {type(value).__name__} values, not text"
            )
        texts.append(value)
    return texts


def _load_files(files: list[Path], source: str, text_column: str) -> list[str]:
    """Documents from local files, in the given order; one ``load_dataset`` call per run of a type."""
    texts: list[str] = []
    with _quiet_datasets() as datasets:
        for builder, group in itertools.groupby(files, key=lambda f: SUPPORTED_SUFFIXES[f.suffix.lower()]):
            data_files = [str(f) for f in group]
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                where = (
                    data_files[0]
                    if len(data_files) == 1
                    else f"{len(data_files)} {builder} files in '{source}'"
                )
                raise KdError(f"could not read {where}: {first}") from None
            texts.extend(_column_texts(ds, source, "text" if builder == "text" else text_column))
    return texts


def _looks_local(source: str) -> bool:
    path = Path(source).expanduser()
    return (
        path.exists() or path.suffix.lower() in SUPPORTED_SUFFIXES or source.startswith((".", "/", "~", "\\"))
    )


def load_texts(source: str, text_column: str = "text") -> list[str]:
    """Documents from a local file or folder, or a hub dataset ``name[:config[:split]]``.

    A ``.txt`` file is one document (its whole text); ``.jsonl``/``.json``/``.csv``/``.parquet``
    give one document per row of ``text_column`` (``None`` values are skipped); a folder gives all
    supported files inside it, recursively, sorted by path, hidden ones skipped.
    """
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise KdError(f"dataset '{source}' not found; {_SOURCE_HINT}")
        if path.is_dir():
            files = sorted(
                (
                    f
                    for f in path.rglob("*")
                    if f.is_file()
                    and f.suffix.lower() in SUPPORTED_SUFFIXES
                    and not any(part.startswith(".") for part in f.relative_to(path).parts)
                ),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not files:
                raise KdError(
                    f"folder '{source}' holds no .txt/.jsonl/.json/.csv/.parquet files; {_SOURCE_HINT}"
                )
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            files = [path]
        else:
            raise KdError(f"dataset '{source}' has an unsupported file type '{path.suffix}'; {_SOURCE_HINT}")
        return _load_files(files, source, text_column)
    return _load_hub(source, text_column)


def _load_hub(source: str, text_column: str) -> list[str]:
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise KdError(f"dataset '{source}' is not a hub name[:config[:split]]; {_SOURCE_HINT}")
    name, config, split = (*parts, None, None)[:3]
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KdError(
                f"dataset '{source}' is not a local path and could not be loaded from the hub ({first}); "
                f"{_SOURCE_HINT}"
            ) from None
    return _column_texts(ds, source, text_column)


def split_tail(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``fraction`` of the characters of the concatenated documents.

    ``round(total * fraction)`` characters go to the eval part; a document straddling the cut is
    split in two. For one file this is ``text[:cut], text[cut:]`` with ``cut = total - n_eval``.
    """
    total = sum(len(t) for t in texts)
    n_eval = round(total * fraction)
    if n_eval < 1 or n_eval >= total:
        raise KdError(
            f"cannot hold out {fraction:g} of {total} characters for evaluation; "
            "pass more text, another data.eval_fraction, or data.eval_dataset"
        )
    cut = total - n_eval
    train: list[str] = []
    held: list[str] = []
    start = 0
    for text in texts:
        end = start + len(text)
        if end <= cut:
            train.append(text)
        elif start >= cut:
            held.append(text)
        else:
            train.append(text[: cut - start])
            held.append(text[cut - start :])
        start = end
    return [t for t in train if t], [t for t in held if t]


# --------------------------------------------------------------------------- train / eval splits


@dataclass
class Corpus:
    """Train and eval texts before tokenisation (so a BPE can be trained on ``train_texts``)."""

    train_texts: list[str]
    eval_texts: list[str]
    train_levels: list[int] | None = None
    eval_levels: list[int] | None = None
    per_document: bool = False  # one sample per text (the demo corpus)
    max_eval_samples: int | None = None  # keep the first ones

    @property
    def fingerprint(self) -> str:
        """16 hex characters of sha256 over everything here: identifies the text before tokenisation
        (a cache key for a teacher trained on it; :attr:`PackedDataset.fingerprint` is the tokenised one)."""
        digest = hashlib.sha256(f"kdcore-corpus-1 {self.per_document} {self.max_eval_samples}".encode())
        for name, texts, levels in (
            ("train", self.train_texts, self.train_levels),
            ("eval", self.eval_texts, self.eval_levels),
        ):
            digest.update(f"\0{name} {len(texts)} {levels}".encode())
            for text in texts:
                data = text.encode("utf-8")
                digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()[:16]

    def pack(self, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> tuple[PackedDataset, PackedDataset]:
        """``(train, eval)`` packed datasets; eval capped at ``max_eval_samples``."""
        eval_texts, eval_levels = self.eval_texts, self.eval_levels
        if self.per_document and self.max_eval_samples is not None:  # cheaper: cap before tokenising
            eval_texts = eval_texts[: self.max_eval_samples]
            eval_levels = None if eval_levels is None else eval_levels[: self.max_eval_samples]
        packed = []
        for name, texts, levels in (
            ("training", self.train_texts, self.train_levels),
            ("eval", eval_texts, eval_levels),
        ):
            try:
                packed.append(pack(texts, tokenizer, seq_len, levels=levels, per_document=self.per_document))
            except KdError as exc:
                raise KdError(f"{name} split: {exc}") from None
        train, eval_ = packed
        return train, eval_.head(self.max_eval_samples)


def load_corpus(data_cfg: DataConfig, seed: int) -> Corpus:
    """Texts for ``data_cfg``, split into train and eval.

    ``demo``: ``demo_samples`` generated texts for training and ``max(200, eval_fraction * n)``
    more, generated with ``seed + 1_000_003``, for eval (per document, with levels). Otherwise
    :func:`load_texts`; eval is ``data_cfg.eval_dataset`` when given, else the last ``eval_fraction``
    of the characters (:func:`split_tail`). ``seed`` only matters for the demo corpus.
    """
    from kdcore.demo import generate_demo_corpus

    source, eval_source = data_cfg.dataset, data_cfg.eval_dataset
    if "demo" in (source, eval_source) and eval_source is not None:
        raise KdError(
            "the demo corpus generates its own eval set and cannot be mixed with other data; "
            "leave data.eval_dataset unset with data.dataset 'demo'"
        )
    if source == "demo":
        n_train = data_cfg.demo_samples
        n_eval = max(MIN_DEMO_EVAL, math.ceil(n_train * data_cfg.eval_fraction))
        train = generate_demo_corpus(n_train, seed)
        held = generate_demo_corpus(n_eval, seed + DEMO_EVAL_SEED_OFFSET)
        return Corpus(
            train_texts=[t for t, _ in train],
            eval_texts=[t for t, _ in held],
            train_levels=[level for _, level in train],
            eval_levels=[level for _, level in held],
            per_document=True,
            max_eval_samples=data_cfg.max_eval_samples,
        )
    texts = load_texts(source, data_cfg.text_column)
    if eval_source is not None:
        train_texts, eval_texts = texts, load_texts(eval_source, data_cfg.text_column)
    else:
        train_texts, eval_texts = split_tail(texts, data_cfg.eval_fraction)
    return Corpus(train_texts, eval_texts, max_eval_samples=data_cfg.max_eval_samples)


def load_splits(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[PackedDataset, PackedDataset]:
    """``(train, eval)`` packed with an existing tokenizer: ``load_corpus(...).pack(...)``."""
    return load_corpus(data_cfg, seed).pack(tokenizer, data_cfg.seq_len)
