"""Which teacher a run distils from, and the tokenizer its data is packed with: decided here, once.

A teacher is a hub id, a local ``save_pretrained`` directory or a GGUF file (converted once into a
cached directory, see :mod:`kdcore.inputs.gguf`), which brings its own tokenizer, or a from-scratch
spec (``gpt2:n_layer=4,n_embd=128``) that is trained once on the run's data (all of its training text,
also when ``data.train_share`` gives the student less) and cached in ``<cache root>/teachers/<key>``.
The key covers the spec, the tokenizer, the data, the sequence length and the training settings, so a
teacher trained another way gets another directory. Two processes that need the same new teacher at
once train it once: the second waits on a file lock beside the directory (:func:`teacher_lock`), then reuses it.

:func:`locate_teacher` makes the decision without loading or training anything (``kd run
--dry-run`` and ``kd run --teacher-cache`` stop there); :func:`resolve_teacher` then trains a spec
teacher (or converts a GGUF file) the first time and returns what ``from_pretrained`` loads (``kd run``, ``kd cache-teacher``,
``kd compare``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcore.errors import KdError
from kdcore.files import cache_root, file_sha256
from kdcore.inputs.gguf import converted_directory, local_file, parse_gguf_source
from kdcore.inputs.models import ModelSpec, check_sources, load_tokenizer, parse_spec
from kdcore.inputs.tokenization import build_tokenizer

if TYPE_CHECKING:
    from rich.console import Console

    from kdcore.config import ModelConfig, TrainingConfig
    from kdcore.inputs.corpus import Corpus


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def spec_teacher_dir(model: ModelConfig, corpus: Corpus, seq_len: int, training: TrainingConfig) -> Path:
    """Where the from-scratch teacher ``model.teacher`` trained for this data and config is cached."""
    key = cache_key(
        teacher=model.teacher,
        tokenizer=model.tokenizer or "byte",
        data=corpus.for_teacher().fingerprint,
        seq_len=seq_len,
        steps=model.teacher_steps,
        seed=training.seed,
        batch=training.batch_size,
        lr=training.lr,
    )
    return cache_root() / "teachers" / key


@dataclass(frozen=True)
class TeacherSource:
    """A run's teacher, located but not loaded: a hub id or directory, or a spec and its cache directory."""

    name: str  # model.teacher, as given
    spec: ModelSpec | None  # a from-scratch spec, else None
    directory: Path | None  # where the spec teacher is (or will be) cached
    tokenizer_spec: str  # the tokenizer a spec teacher is trained with
    trust_remote_code: bool = False
    content: str = ""  # a local GGUF file's SHA-256 (16 hex characters): the file, wherever it is named from

    @property
    def trained(self) -> bool:
        """Whether its weights exist: always for a hub id or directory, for a spec once it is cached."""
        return self.directory is None or (self.directory / "config.json").is_file()

    @property
    def source(self) -> str:
        """What ``from_pretrained`` loads: the name, or a spec teacher's cache directory."""
        return self.name if self.directory is None else str(self.directory)

    @property
    def identity(self) -> str:
        """The name, and for a spec the key of its cached training (another training run differs); a local
        GGUF file is its content, so a file changed at the same path differs and one path for another does not."""
        if self.content:
            return f"GGUF sha256:{self.content}"
        return self.name if self.directory is None else f"{self.name}@{self.directory.name}"

    @property
    def kind(self) -> str:
        if self.spec is None:
            if parse_gguf_source(self.name) is not None:
                return "GGUF file"
            return "directory" if Path(self.name).is_dir() else "hub"
        return "cached teacher" if self.trained else "spec (to be trained)"

    def tokenizer(self, corpus: Corpus) -> Any:
        """The tokenizer the run's data is packed with: the teacher's own, or for a spec teacher that is
        not trained yet the one it will be trained with (built from the corpus, no model needed)."""
        if self.spec is None:
            return load_tokenizer(self.name, trust_remote_code=self.trust_remote_code)
        if self.trained:
            return load_tokenizer(self.source)
        return build_tokenizer(self.tokenizer_spec, corpus.for_teacher().train_texts)


def locate_teacher(
    model: ModelConfig,
    corpus: Corpus,
    seq_len: int,
    training: TrainingConfig,
    cache_manifest: Mapping[str, Any] | None = None,
) -> TeacherSource:
    """The teacher ``model`` names, for this data and training config; loads and trains nothing.

    ``cache_manifest``: the manifest of the ``--teacher-cache`` the run trains from. A cache made for a
    teacher of another name is refused here, saying which ``--teacher`` to pass; the usual slip is
    ``--teacher-cache`` alone, which leaves the run with the default teacher.
    """
    check_sources(model.teacher, model.student)
    spec = parse_spec(model.teacher)
    if spec is None and model.tokenizer:
        raise KdError(
            f"--tokenizer applies only to from-scratch teachers; '{model.teacher}' brings its own tokenizer"
        )
    directory = None if spec is None else spec_teacher_dir(model, corpus, seq_len, training)
    gguf = parse_gguf_source(model.teacher) if spec is None else None
    content = file_sha256(local_file(gguf))[:16] if gguf is not None and gguf.local else ""
    teacher = TeacherSource(
        model.teacher, spec, directory, model.tokenizer or "byte", model.trust_remote_code, content
    )
    manifest = cache_manifest or {}
    cached = manifest.get("teacher")
    if cached not in (None, model.teacher) and manifest.get("teacher_id") != teacher.identity:
        raise KdError(
            f"teacher cache '{model.teacher_cache}' holds teacher '{cached}' but this run's teacher is "
            f"'{model.teacher}'; pass --teacher {cached} with --teacher-cache (and the options the cache "
            f"was made with), or rebuild the cache with kd cache-teacher --teacher {model.teacher}"
        )
    return teacher


def resolve_teacher(
    model: ModelConfig, corpus: Corpus, seq_len: int, training: TrainingConfig, console: Console
) -> tuple[str, Any]:
    """The teacher's source (directory or hub id) and tokenizer; trains a spec teacher or converts a GGUF file
    once and caches it."""
    teacher = locate_teacher(model, corpus, seq_len, training)
    gguf = parse_gguf_source(teacher.name) if teacher.spec is None else None
    if gguf is not None:
        directory = str(converted_directory(gguf, echo=functools.partial(console.print, highlight=False)))
        return directory, load_tokenizer(directory)
    if teacher.spec is None:
        return teacher.source, teacher.tokenizer(corpus)
    if not teacher.trained:
        assert teacher.directory is not None
        with teacher_lock(teacher.directory, console):
            if not teacher.trained:  # another process may have trained it meanwhile
                _train_spec_teacher(teacher, model, corpus, seq_len, training, console)
                return teacher.source, load_tokenizer(teacher.source)
    console.print(f"[dim]Using the cached teacher in {teacher.directory}[/dim]")
    return teacher.source, teacher.tokenizer(corpus)


def _train_spec_teacher(
    teacher: TeacherSource,
    model: ModelConfig,
    corpus: Corpus,
    seq_len: int,
    training: TrainingConfig,
    console: Console,
) -> None:
    """Train the spec teacher once into its cache directory (plain CE, ``model.teacher_steps`` steps)."""
    console.print(
        f"Training the teacher [bold]{model.teacher}[/bold] once ({model.teacher_steps} steps); "
        f"it is cached in {teacher.directory}"
    )
    from kdcore.teachers.train import train_causal_lm

    teacher_training = training.model_copy(update={"max_steps": model.teacher_steps, "epochs": None})
    train_causal_lm(
        model.teacher,
        teacher.tokenizer(corpus),
        corpus.for_teacher(),
        seq_len,
        teacher_training,
        teacher.directory,
        console,
    )


@contextlib.contextmanager
def teacher_lock(directory: Path, console: Console) -> Iterator[None]:
    """While held, no other process trains the teacher cached in ``directory``: the second waits, then reuses it.

    The processes of one launch (accelerate launch) train it together: the main process takes the lock
    and the others wait for it at a barrier.
    """
    from accelerate import PartialState
    from filelock import FileLock, Timeout

    state = PartialState()
    lock = FileLock(f"{directory}.lock")
    if state.is_main_process:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            console.print(
                f"[dim]Waiting for another kd process that is training this teacher ({lock.lock_file})[/dim]"
            )
            lock.acquire()
    try:
        state.wait_for_everyone()
        yield
    finally:
        if state.is_main_process:
            lock.release()
