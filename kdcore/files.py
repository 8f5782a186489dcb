"""Atomic file output, checksums and kdcore's cache directory: a killed run never leaves a file (or directory)
that lies.

Every file kdcore writes for a user goes through here: text and JSON (:func:`atomic_write_text`,
:func:`atomic_write_json`), files written by a library that takes a file name, such as plots and
parquet tables (:func:`atomic_path`), and whole directories (:func:`atomic_directory`). An output
directory is checked before any work (:func:`check_output_dir`): a file in its place or a parent that
cannot be written is one sentence, not a traceback after training. What kdcore keeps between runs
(trained spec teachers, converted GGUF models) lives under :func:`cache_root`.

A writer that is killed leaves at most a hidden ``.NAME.PID.XXXXXXXX.tmp`` beside ``NAME``; the next
write of ``NAME`` removes it (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdcore.errors import KdError


def umask() -> int:
    """The process umask, read from /proc where it can be (setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(path: Path) -> None:
    """Give ``path`` (and a directory's whole tree) the modes a plain ``open()``/``mkdir()`` would.

    ``mkstemp``/``mkdtemp`` make 0600/0700 temporaries, and safetensors writes 0600 files; a
    published output must follow the umask like any other file.
    """
    mask = umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, _dirs, files in os.walk(path):
        os.chmod(root, dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


def _temp_prefix(path: Path) -> str:
    """Temporaries are ``.NAME.PID.XXXXXXXX.tmp`` beside ``path``: the PID tells a killed writer's from a live one's."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries a killed writer of ``path`` left beside it (those of a process that is gone).

    Only kdcore's own names are touched; a name without a PID comes from an older kdcore and is stale.
    """
    own = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp$")
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        found = own.match(entry.name)
        if found is None or (found.group(1) is not None and _alive(int(found.group(1)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed to ``path`` only when the block succeeds.

    The temporary is ``.NAME.PID.XXXXXXXX.tmp``, whatever ``path``'s suffix: a writer that picks its
    format from the file name must be told it (``savefig(format="png")``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        default_permissions(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    """Where kdcore caches trained spec teachers and converted GGUF models (``KD_CACHE_DIR`` overrides the
    user cache dir)."""
    env = os.environ.get("KD_CACHE_DIR")
    if env:
        root, where = Path(env), f"KD_CACHE_DIR '{env}'"
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("kdcore"))
        where = f"the cache directory '{root}'"
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        blocked = "is a file" if existing == root else f"cannot be created: '{existing}' is a file"
        raise KdError(f"{where} {blocked}; set KD_CACHE_DIR to a directory")
    return root


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (checkpoints and teacher caches verify with it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(path: Path, option: str) -> None:
    """Refuse, before any work, an output directory that is a file or cannot be created or written.

    Nothing is left behind: writability is probed with a temporary directory that is removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdError(f"{option} '{path}' is a file; pass a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KdError(f"{option} '{path}' cannot be created: '{existing}' is a file; pass another directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".kd-probe-"))
    except OSError as exc:
        raise KdError(
            f"{option} '{path}' cannot be created or written ({exc.strerror} in '{existing}'); pass a "
            "directory you can write to"
        ) from None
