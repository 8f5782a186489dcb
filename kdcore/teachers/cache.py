"""The teacher cache: run the teacher once, train any number of students without it.

``kd cache-teacher`` packs the training set exactly as ``kd run`` does (same corpus loading, same
tokenizer, same ``seq_len``, so sample ids match), runs the teacher once without gradient and
writes, for every position that has a label (``shift_labels(...) != IGNORE_INDEX``), the teacher's ``K``
most likely tokens. ``kd run --teacher-cache DIR`` (config ``model.teacher_cache``) then trains
with no teacher model in memory: :meth:`TeacherCache.topk` hands the trainer a sparse
:class:`~kdcore.training.losses.TopKTeacher` and :func:`~kdcore.training.losses.per_sample_terms` computes the KD
term over the ``K`` tokens plus one "rest" bucket (see :mod:`kdcore.training.losses` for the formula and
why ``K = V`` is the full-vocabulary KD exactly).

What is stored, in ``DIR``:

- ``logprobs.npy`` ``[tokens, K]``: log-probabilities at temperature 1 (``log_softmax`` of the raw
  logits over the full vocabulary), sorted by decreasing probability; float32 by default, float16
  with ``--dtype float16`` (half the size, about 1e-3 relative error on each log-probability).
  Log-probabilities rather than logits: they differ by one constant per token, which a softmax at
  any temperature ignores, and they give the tail's mass directly. Temperature is applied at train
  time: ``softmax(log p_k / τ)`` over the K tokens plus the tail bucket.
- ``indices.npy`` ``[tokens, K]``: the token ids (uint16 when the vocabulary has at most 65,536
  tokens, else int32).
- ``tail.npy`` ``[tokens, 2]`` float32: ``log Σ_{j ∉ top-K} p_j^β`` for β = 1 (the tail's
  log-mass) and β = 1/2 (what τ = 2 needs), computed from the full distribution; absent when
  ``K = V``.
- ``offsets.npy`` ``[samples + 1]`` int64: the rows of sample ``i`` are ``offsets[i]:offsets[i+1]``,
  its labelled positions in order. Only labelled positions are stored (no padding).
- ``teacher_stats.safetensors``: per-sample ``ce``, ``confidence`` and ``entropy`` of the teacher
  over the full distribution (what ``teacher-confidence`` needs), from the same pass.
- ``tokenizer/``: the tokenizer the data was packed with.
- ``manifest.json``: format, teacher and its identity, the train share, tokenizer hash, the packed training and
  eval sets' fingerprints, ``seq_len``, ``K``, vocabulary size, dtypes, sizes, the teacher's eval
  perplexity (measured at cache time, so a cached run can report it) and a sha256 per file.

All arrays are plain ``.npy`` files opened with ``numpy.load(mmap_mode="r")``: a run reads only
the rows of its batches. Size: ``tokens · (K · (4 + 2) + 8)`` bytes with float32 values and uint16
ids (the demo corpus, 2000 samples of ~60 tokens, K = 32: ~24 MB).

A cache is refused, before training, when the run's teacher, tokenizer, ``seq_len`` or packed
data differ from the cache's (one sentence naming the field).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdcore.errors import KdError
from kdcore.files import check_output_dir, file_sha256
from kdcore.teachers.resolve import locate_teacher, resolve_teacher
from kdcore.training.losses import TopKTeacher

if TYPE_CHECKING:
    from rich.console import Console

    from kdcore.config import ModelConfig, RunConfig, TrainingConfig
    from kdcore.inputs.corpus import Corpus
    from kdcore.inputs.packing import PackedDataset

__all__ = ["FORMAT", "TeacherCache", "build_cache", "open_for_run", "teacher_identity", "tokenizer_hash"]

FORMAT = "kdcore-teacher-cache/1"
MANIFEST = "manifest.json"
STATS = "teacher_stats.safetensors"
VALUE_DTYPES = ("float32", "float16")
#: Rows of [rows, V] float32 processed at once while building: bounds memory at large vocabularies.
_BUILD_ELEMENTS = 1 << 24


# -- identities ------------------------------------------------------------------------------------
def tokenizer_hash(tokenizer: Any) -> str:
    """16 hex characters of sha256 over the sorted vocabulary (token -> id) as JSON."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def teacher_identity(model: ModelConfig, corpus: Corpus, seq_len: int, training: TrainingConfig) -> str:
    """What the teacher is: a hub id or directory as given, or for a from-scratch spec the spec plus
    the key of its cached training (data, steps, seed, batch, lr), so another training run differs."""
    return locate_teacher(model, corpus, seq_len, training).identity


def _valid_positions(data: PackedDataset) -> torch.Tensor:
    """``[N, T]`` bool: positions whose next-token label counts (the rows a cache stores)."""
    from kdcore.inputs.packing import IGNORE_INDEX

    return data.batch(slice(None))[2] != IGNORE_INDEX


# -- building --------------------------------------------------------------------------------------
@torch.no_grad()
def write_cache(
    teacher: torch.nn.Module,
    train: PackedDataset,
    eval_set: PackedDataset,
    tokenizer: Any,
    directory: Path,
    *,
    top_k: int,
    dtype: str = "float32",
    batch_size: int = 32,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``teacher`` over ``train`` once and write the cache into ``directory`` (atomically).

    Returns the manifest. ``metadata`` (teacher, teacher_id, ...) is merged into the manifest.
    """
    from safetensors.torch import save_file

    from kdcore.files import atomic_directory, atomic_write_json
    from kdcore.inputs.models import vocab_size as model_vocab_size
    from kdcore.training.evaluation import perplexity

    if dtype not in VALUE_DTYPES:
        raise KdError(f"cache dtype '{dtype}' is not supported; use one of {', '.join(VALUE_DTYPES)}")
    if top_k < 1:
        raise KdError(f"--top-k must be at least 1, got {top_k}")
    vocab = model_vocab_size(teacher)
    offsets = np.concatenate([[0], np.cumsum(_valid_positions(train).sum(1).numpy())]).astype(np.int64)
    if int(offsets[-1]) == 0:
        raise KdError("the training set has no token to predict; nothing to cache")

    was_training = teacher.training
    teacher.eval()
    start = time.perf_counter()
    with atomic_directory(Path(directory)) as tmp:
        arrays = _CacheArrays(tmp, int(offsets[-1]), min(top_k, vocab), vocab, dtype)
        np.save(tmp / "offsets.npy", offsets)
        stats = _teacher_pass(teacher, train, batch_size, arrays)
        save_file(stats, str(tmp / STATS))
        cache_seconds = time.perf_counter() - start
        measured = {"teacher_eval_ppl": perplexity(teacher, eval_set), "cache_seconds": cache_seconds}
        tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = _manifest(metadata or {}, tokenizer, train, eval_set, arrays, measured, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    teacher.train(was_training)
    return manifest


def _manifest(
    metadata: dict[str, Any],
    tokenizer: Any,
    train: PackedDataset,
    eval_set: PackedDataset,
    arrays: _CacheArrays,
    measured: dict[str, float],
    directory: Path,
) -> dict[str, Any]:
    """manifest.json (see the module docstring); every file already in ``directory`` gets its checksum."""
    return {
        "format": FORMAT,
        **metadata,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "train_fingerprint": train.fingerprint,
        "eval_fingerprint": eval_set.fingerprint,
        "seq_len": train.seq_len,
        "num_samples": len(train),
        "num_tokens": arrays.n_tokens,
        "top_k": arrays.k,
        "vocab_size": arrays.vocab,
        "dtype": arrays.dtype,
        "index_dtype": np.dtype(arrays.index_dtype).name,
        "has_tail": arrays.has_tail,
        "tail_betas": [1.0, 0.5] if arrays.has_tail else [],
        **measured,  # teacher_eval_ppl, cache_seconds
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {
            p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(directory.iterdir())
            if p.is_file()
        },
    }


class _CacheArrays:
    """The memory-mapped arrays of a cache being written, filled in order a piece of positions at a time."""

    def __init__(self, directory: Path, n_tokens: int, k: int, vocab: int, dtype: str) -> None:
        self.n_tokens, self.k, self.vocab, self.dtype = n_tokens, k, vocab, dtype
        self.index_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
        self.has_tail = k < vocab
        self.logprobs = np.lib.format.open_memmap(
            directory / "logprobs.npy", "w+", np.dtype(dtype), (n_tokens, k)
        )
        self.indices = np.lib.format.open_memmap(
            directory / "indices.npy", "w+", self.index_dtype, (n_tokens, k)
        )
        self.tail = (
            np.lib.format.open_memmap(directory / "tail.npy", "w+", np.float32, (n_tokens, 2))
            if self.has_tail
            else None
        )
        self.row = 0

    def write(self, logp: torch.Tensor) -> None:
        """The next ``n`` positions, given their full log-probabilities ``[n, V]``."""
        values, indices = logp.topk(self.k, dim=-1)
        n = logp.shape[0]
        self.logprobs[self.row : self.row + n] = values.cpu().numpy().astype(self.dtype)
        self.indices[self.row : self.row + n] = indices.cpu().numpy().astype(self.index_dtype)
        if self.tail is not None:
            rest = logp.scatter(-1, indices, float("-inf"))
            tail = torch.stack([rest.logsumexp(-1), (0.5 * rest).logsumexp(-1)], dim=-1)
            self.tail[self.row : self.row + n] = tail.cpu().numpy()
        self.row += n

    def close(self) -> None:
        assert self.row == self.n_tokens, (self.row, self.n_tokens)
        for array in (self.logprobs, self.indices, self.tail):
            if array is not None:
                array.flush()
        self.logprobs = self.indices = self.tail = None


@torch.no_grad()
def _teacher_pass(
    teacher: torch.nn.Module, train: PackedDataset, batch_size: int, arrays: _CacheArrays
) -> dict[str, torch.Tensor]:
    """One no-grad pass over ``train``: the top-K rows into ``arrays``, and the teacher's per-sample
    ``ce``, ``confidence`` and ``entropy`` over the full distribution."""
    from kdcore.inputs.packing import IGNORE_INDEX
    from kdcore.training.losses import per_sample_terms

    device = next(teacher.parameters()).device
    stats: dict[str, list[torch.Tensor]] = {"ce": [], "confidence": [], "entropy": []}
    rows_per_piece = max(1, _BUILD_ELEMENTS // arrays.vocab)
    for first in range(0, len(train), batch_size):
        ids, mask, labels = train.batch(slice(first, first + batch_size), device)
        logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        terms = per_sample_terms(logits, labels)
        stats["ce"].append(terms.ce.cpu())
        stats["confidence"].append(terms.confidence.cpu())
        keep = labels != IGNORE_INDEX
        # the batch's labelled positions in row-major order, a piece at a time (no [n, V] copy)
        flat_rows = keep.reshape(-1).nonzero().squeeze(1)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        entropy_sum = torch.zeros(len(ids), dtype=torch.float64)
        for piece_rows in flat_rows.split(rows_per_piece):
            owner = torch.div(piece_rows, labels.shape[1], rounding_mode="floor")
            logp = torch.log_softmax(flat_logits.index_select(0, piece_rows), dim=-1)
            token_entropy = -(logp.exp() * logp).sum(-1)
            entropy_sum.index_add_(0, owner.cpu(), token_entropy.double().cpu())
            arrays.write(logp)
        stats["entropy"].append((entropy_sum / keep.sum(1).cpu().clamp(min=1)).float())
    arrays.close()
    return {key: torch.cat(parts).contiguous() for key, parts in stats.items()}


def build_cache(
    cfg: RunConfig,
    output: Path,
    *,
    top_k: int = 64,
    dtype: str = "float32",
    batch_size: int = 32,
    console: Console | None = None,
) -> dict[str, Any]:
    """``kd cache-teacher``: resolve the teacher and the data exactly as ``kd run`` would, then
    :func:`write_cache`. Returns the manifest."""
    from rich.console import Console

    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.cut import parse_cut_spec
    from kdcore.inputs.models import (
        check_seq_len,
        load_pretrained,
        model_config,
        quiet_transformers,
        remote_code_warning,
    )

    if parse_cut_spec(cfg.model.teacher) is not None:  # kd run's advice (pass it as --student) does not apply
        raise KdError(
            f"'{cfg.model.teacher}' describes a student cut from a teacher, and kd cache-teacher caches a "
            "teacher's outputs; pass --teacher a hub id, directory, GGUF file or spec"
        )
    console = console or Console(stderr=True)
    remote = remote_code_warning(cfg.model.teacher, None, cfg.model.trust_remote_code)
    if remote:
        console.print(remote, style="yellow", highlight=False, markup=False, soft_wrap=True)
    output = Path(output)
    check_output_dir(output, "--output")
    if (output / MANIFEST).exists():
        raise KdError(f"'{output}' already holds a teacher cache; choose another --output or remove it")
    if output.exists() and any(output.iterdir()):
        raise KdError(f"output directory '{output}' is not empty; choose another --output or remove it")
    quiet_transformers()
    teacher_config = model_config(cfg.model.teacher, trust_remote_code=cfg.model.trust_remote_code)
    check_seq_len(cfg.data.seq_len, teacher_config, "teacher", cfg.model.teacher)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.training.seed)
    corpus = load_corpus(cfg.data, cfg.training.seed)
    source, tokenizer = resolve_teacher(cfg.model, corpus, cfg.data.seq_len, cfg.training, console)
    teacher = load_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    notes: list[str] = []  # chat rows cut at seq_len or dropped
    train, eval_set = corpus.pack(tokenizer, cfg.data.seq_len, notes)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]", highlight=False)
    metadata = {
        "teacher": cfg.model.teacher,
        "teacher_id": teacher_identity(cfg.model, corpus, cfg.data.seq_len, cfg.training),
        "teacher_source": source,
        "dataset": cfg.data.dataset,
        "train_share": cfg.data.student_share,
        "corpus_fingerprint": corpus.fingerprint,
    }
    manifest = write_cache(
        teacher,
        train,
        eval_set,
        tokenizer,
        output,
        top_k=top_k,
        dtype=dtype,
        batch_size=batch_size,
        metadata=metadata,
    )
    size = sum(f["bytes"] for f in manifest["files"].values())
    console.print(
        f"Cached the teacher's top-{manifest['top_k']} of {manifest['vocab_size']} tokens for "
        f"{manifest['num_samples']} samples ({manifest['num_tokens']} tokens, {size / 2**20:.1f} MiB) "
        f"in {output} in {manifest['cache_seconds']:.1f} s; teacher eval perplexity "
        f"{manifest['teacher_eval_ppl']:.3f}",
        highlight=False,
    )
    return manifest


# -- reading ---------------------------------------------------------------------------------------
class TeacherCache:
    """A cache directory opened for training: memory-mapped arrays and the manifest."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.top_k = int(manifest["top_k"])
        self.vocab_size = int(manifest["vocab_size"])
        self.offsets = np.load(self.directory / "offsets.npy")
        self._logprobs = np.load(self.directory / "logprobs.npy", mmap_mode="r")
        self._indices = np.load(self.directory / "indices.npy", mmap_mode="r")
        self._tail = np.load(self.directory / "tail.npy", mmap_mode="r") if manifest["has_tail"] else None
        self._stats: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, directory: str | Path, *, verify: bool = True) -> TeacherCache:
        """Open ``directory``; with ``verify``, every file's sha256 is checked against the manifest."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise KdError(
                f"'{directory}' is not a teacher cache (no {MANIFEST}); write one with kd cache-teacher"
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise KdError(f"teacher cache manifest '{path}' is not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise KdError(
                f"teacher cache '{directory}' has format {manifest.get('format')!r}, this kdcore reads "
                f"{FORMAT!r}; rebuild it with kd cache-teacher"
            )
        for name, info in manifest["files"].items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != info["bytes"]:
                raise KdError(f"teacher cache '{directory}' is incomplete: '{name}' is missing or truncated")
            if verify and file_sha256(file) != info["sha256"]:
                raise KdError(
                    f"teacher cache '{directory}' is corrupt: the checksum of '{name}' does not match"
                )
        return cls(directory, manifest)

    @property
    def teacher_eval_ppl(self) -> float:
        return float(self.manifest["teacher_eval_ppl"])

    def tokenizer(self) -> Any:
        from kdcore.inputs.models import load_tokenizer

        return load_tokenizer(str(self.directory / "tokenizer"))

    def check(self, field: str, key: str, run_value: Any) -> None:
        """Refuse the cache with one sentence when the manifest's ``key`` differs from the run's value."""
        cached = self.manifest.get(key)
        if cached != run_value:
            raise KdError(
                f"teacher cache '{self.directory}' does not match this run: its {field} is {cached!r} but "
                f"the run's is {run_value!r}; rebuild it with kd cache-teacher and the run's config"
            )

    def check_data(self, train: PackedDataset, eval_set: PackedDataset) -> None:
        """Refuse the cache when the packed training or eval set differs from the one it was made on."""
        self.check("seq_len", "seq_len", train.seq_len)
        self.check("training data fingerprint", "train_fingerprint", train.fingerprint)
        self.check("eval data fingerprint", "eval_fingerprint", eval_set.fingerprint)

    def stats(self) -> dict[str, torch.Tensor]:
        """The teacher's per-sample ``ce``, ``confidence``, ``entropy`` (``ScorerContext.teacher_stats``)."""
        if self._stats is None:
            from safetensors.torch import load_file

            self._stats = load_file(str(self.directory / STATS))
        return {key: value.clone() for key, value in self._stats.items()}

    def rows(self, sample_ids: torch.Tensor) -> np.ndarray:
        """Cache rows of ``sample_ids``, concatenated in order (each sample's positions in order)."""
        ids = np.asarray(torch.as_tensor(sample_ids).cpu().numpy(), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.offsets) - 1):
            raise KdError(f"sample id out of range for teacher cache '{self.directory}'")
        starts = self.offsets[ids]
        counts = self.offsets[ids + 1] - starts
        total = int(counts.sum())
        # row r of the output is starts[s] + (r − first output row of sample s)
        firsts = np.cumsum(counts) - counts
        return np.repeat(starts - firsts, counts) + np.arange(total, dtype=np.int64)

    def topk(self, sample_ids: torch.Tensor, labels: torch.Tensor) -> TopKTeacher:
        """The cached teacher for a batch whose next-token ``labels`` are given, as a :class:`TopKTeacher`
        ``[B, T, K]`` on the labels' device."""
        from kdcore.inputs.packing import IGNORE_INDEX

        valid = labels != IGNORE_INDEX
        rows = self.rows(sample_ids)
        if rows.size != int(valid.sum()):
            raise KdError(
                f"teacher cache '{self.directory}' holds {rows.size} positions for this batch but the batch "
                f"has {int(valid.sum())}; the cache belongs to other data"
            )
        device = labels.device
        shape = (*valid.shape, self.top_k)
        logprobs = torch.zeros(shape, dtype=torch.float32, device=device)
        indices = torch.zeros(shape, dtype=torch.long, device=device)
        logprobs[valid] = torch.from_numpy(self._logprobs[rows].astype(np.float32, copy=False)).to(device)
        indices[valid] = torch.from_numpy(self._indices[rows].astype(np.int64)).to(device)
        tail = None
        if self._tail is not None:
            tail = torch.zeros((*valid.shape, 2), dtype=torch.float32, device=device)
            tail[valid] = torch.from_numpy(np.asarray(self._tail[rows])).to(device)
        return TopKTeacher(logprobs, indices, tail, self.vocab_size)


def open_for_run(cfg: RunConfig, corpus: Corpus, console: Console) -> tuple[TeacherCache, Any]:
    """``kd run --teacher-cache``: open the cache and check the run's teacher and tokenizer against it,
    without loading the teacher model; returns the cache and the tokenizer to pack the data with.
    (The packed data is checked by :meth:`TeacherCache.check_data` once it exists.)"""
    assert cfg.model.teacher_cache is not None
    cache = TeacherCache.open(cfg.model.teacher_cache)
    seq_len = cfg.data.seq_len
    # a cache made for another teacher is refused first, naming it (the usual slip: no --teacher)
    teacher = locate_teacher(cfg.model, corpus, seq_len, cfg.training, cache_manifest=cache.manifest)
    # Most specific first: a from-scratch teacher's identity includes its data and seq_len.
    cache.check("seq_len", "seq_len", seq_len)
    ours = cfg.data.student_share
    share = cache.manifest.get("train_share", ours)  # recorded since caches know it
    if share != ours:
        raise KdError(
            f"teacher cache '{cache.directory}' holds the first {share:g} of the training text "
            f"(data.train_share) and this run trains on {ours:g}; pass --train-share {share:g}, "
            f"or rebuild the cache with kd cache-teacher --set data.train_share={ours:g}"
        )
    cache.check("dataset (fingerprint of the text)", "corpus_fingerprint", corpus.fingerprint)
    cache.check(
        "teacher (a from-scratch spec includes its training steps, seed, batch size and lr; a GGUF file is "
        "its content)",
        "teacher_id",
        teacher.identity,
    )
    # the teacher model itself is not needed: a spec teacher not trained yet gets its tokenizer from the data
    cache.check(
        "tokenizer (sha256 of the sorted vocabulary)",
        "tokenizer_hash",
        tokenizer_hash(teacher.tokenizer(corpus)),
    )
    console.print(
        f"[dim]Training from the teacher cache {cache.directory} (top-{cache.top_k} of "
        f"{cache.vocab_size} tokens); no teacher model is loaded[/dim]"
    )
    return cache, cache.tokenizer()
