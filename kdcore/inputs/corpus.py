"""Corpora: loading text, splitting it into train and eval, and packing it with a tokenizer.

The engine's path is three calls::

    corpus = load_corpus(cfg.data, seed)                      # texts, split into train / eval
    tokenizer = build_tokenizer("bpe:vocab_size=2000", corpus.train_texts)   # or the model's own
    train, eval_ = corpus.pack(tokenizer, cfg.data.seq_len)   # two PackedDatasets

(:func:`load_splits` does the first and last step when the tokenizer already exists;
:attr:`Corpus.fingerprint` identifies the text before tokenisation, e.g. as a teacher-cache key.
Tokenizers are in :mod:`kdcore.inputs.tokenization`, packing in :mod:`kdcore.inputs.packing`.)

Sources (``data.dataset``): ``"demo"`` (the generated corpus of :mod:`kdcore.inputs.demo`, one
sample per text, with known difficulty levels); a local ``.txt`` (one document per file),
``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file (one document per row of
``data.text_column``) or a folder of them; or a hub dataset ``name[:config[:split]]``. Everything
except the demo corpus is read through the ``datasets`` library. A ``.jsonl`` file of chat or
instruction rows (``messages``, or ``prompt`` and ``completion``) is not text to pack but one sample
per row (:class:`kdcore.inputs.chat.ChatCorpus`); ``data.format`` says which (``auto``: chat when the
file's first row is such a row).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcore.errors import KdError
from kdcore.inputs.packing import PackedDataset, pack

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kdcore.config import DataConfig
    from kdcore.inputs.chat import ChatCorpus

DEMO_EVAL_SEED_OFFSET = 1_000_003
MIN_DEMO_EVAL = 200

#: file suffix -> ``datasets`` builder
SUPPORTED_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SOURCE_HINT = (
    "pass a local .txt/.jsonl/.csv/.parquet file or folder, 'demo', "
    "or a hub dataset name like wikitext:wikitext-2-raw-v1:train"
)


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


def _cause(exc: BaseException, kind: type[BaseException]) -> Any:
    """The first exception of type ``kind`` in ``exc``'s chain (datasets wraps the real one), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def not_utf8(where: str, exc: UnicodeDecodeError) -> KdError:
    """The one sentence for a file that is not UTF-8 text, naming the first bad byte."""
    byte = exc.object[exc.start]
    return KdError(
        f"could not read {where}: it is not UTF-8 text (byte 0x{byte:02x} is not valid UTF-8); "
        "convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT, or pass a text file if it is binary"
    )


def _is_blank(path: Path) -> bool:
    """Nothing but whitespace in ``path`` (read until the first other byte, so a real file costs one block)."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def _load_files(files: list[Path], source: str, text_column: str) -> list[str]:
    """Documents from local files, in the given order; one ``load_dataset`` call per run of a type."""
    texts: list[str] = []
    for file in files:
        if file.suffix.lower() != ".parquet" and _is_blank(file):
            raise KdError(f"dataset file '{file}' is empty; pass a file with text in it")
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
                undecodable = _cause(exc, UnicodeDecodeError)
                if undecodable is not None:
                    raise not_utf8(where, undecodable) from None
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


def head_share(texts: Sequence[str], share: float) -> list[str]:
    """The first ``share`` of the characters of the concatenated documents (``data.train_share``).

    ``round(total * share)`` characters are kept, in document order; a document straddling the cut
    is cut, as in :func:`split_tail`. For one file this is ``text[:round(len(text) * share)]``.
    """
    total = sum(len(t) for t in texts)
    keep = round(total * share)
    if keep < 1:
        raise KdError(
            f"data.train_share {share:g} keeps none of the {total} training characters; raise it or pass more text"
        )
    out: list[str] = []
    for text in texts:
        if keep <= 0:
            break
        out.append(text[:keep])
        keep -= len(text)
    return [t for t in out if t]


@dataclass
class Corpus:
    """Train and eval texts before tokenisation (so a BPE can be trained on ``train_texts``)."""

    train_texts: list[str]
    eval_texts: list[str]
    train_levels: list[int] | None = None
    eval_levels: list[int] | None = None
    per_document: bool = False  # one sample per text (the demo corpus)
    max_eval_samples: int | None = None  # keep the first ones
    #: with ``data.train_share`` < 1, the corpus before the share was taken: a from-scratch teacher
    #: trains on all of it (the student's data is limited, the teacher's is not)
    whole: Corpus | None = field(default=None, repr=False, compare=False)

    def share(self, share: float) -> Corpus:
        """The student's corpus: the first ``share`` of the training characters (:func:`head_share`), the
        eval texts unchanged; ``whole`` keeps this corpus for the teacher."""
        if share >= 1:
            return self
        train = head_share(self.train_texts, share)
        levels = None if self.train_levels is None else self.train_levels[: len(train)]
        return replace(self, train_texts=train, train_levels=levels, whole=self)

    def for_teacher(self) -> Corpus:
        """The corpus a from-scratch teacher trains on (and builds its tokenizer from): all the training text."""
        return self.whole if self.whole is not None else self

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

    def pack(
        self, tokenizer: PreTrainedTokenizerBase, seq_len: int, notes: list[str] | None = None
    ) -> tuple[PackedDataset, PackedDataset]:
        """``(train, eval)`` packed datasets; eval capped at ``max_eval_samples``. (``notes``: what a chat
        corpus reports about its rows; packed text has nothing to report.)"""
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


def _chat_format(data_cfg: DataConfig) -> bool:
    """Whether ``data_cfg.dataset`` is read as chat rows: ``data.format``, or for ``auto`` its first row."""
    from kdcore.inputs.chat import is_chat_row

    source = data_cfg.dataset
    is_jsonl = Path(source).suffix.lower() == ".jsonl" and Path(source).is_file()
    if data_cfg.format == "chat" and not is_jsonl:
        raise KdError(
            f"data.format is chat but '{source}' is not a .jsonl file; pass a .jsonl file with one "
            "conversation or prompt/completion pair per line"
        )
    if data_cfg.format != "auto" or not is_jsonl:
        return data_cfg.format == "chat"
    if _is_blank(Path(source)):
        raise KdError(f"dataset file '{source}' is empty; pass a file with text in it")
    with Path(source).open("rb") as handle:
        number, raw = next((n, line) for n, line in enumerate(handle, start=1) if line.strip())
    try:  # utf-8-sig: a byte-order mark is not part of the first row
        first = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise not_utf8(f"line {number} of '{source}'", exc) from None
    try:
        return is_chat_row(json.loads(first))
    except json.JSONDecodeError:
        return False  # the text reader names the bad line


def load_corpus(data_cfg: DataConfig, seed: int) -> Corpus | ChatCorpus:
    """Texts (or chat rows) for ``data_cfg``, split into train and eval.

    ``demo``: ``demo_samples`` generated texts for training and ``max(200, eval_fraction * n)``
    more, generated with ``seed + 1_000_003``, for eval (per document, with levels). Otherwise
    :func:`load_texts`; eval is ``data_cfg.eval_dataset`` when given, else the last ``eval_fraction``
    of the characters (:func:`split_tail`); for chat rows, the last ``eval_fraction`` of the rows. Then
    ``data_cfg.student_share`` < 1 keeps the first share of the training characters (:meth:`Corpus.share`;
    plain text only). ``seed`` only matters for the demo corpus.
    """
    return _load_whole(data_cfg, seed).share(data_cfg.student_share)


def _load_whole(data_cfg: DataConfig, seed: int) -> Corpus | ChatCorpus:
    from kdcore.inputs.chat import load_chat_corpus
    from kdcore.inputs.demo import generate_demo_corpus

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
    if _chat_format(data_cfg):
        return load_chat_corpus(source, eval_source, data_cfg.eval_fraction, data_cfg.max_eval_samples)
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
