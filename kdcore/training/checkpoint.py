"""Checkpoints, resume and graceful stop: ``RUN_DIR/checkpoints/step-N/``.

A checkpoint is written every ``training.checkpoint_every`` steps (and when SIGINT/SIGTERM stops a
run) into ``checkpoints/.step-N.tmp/`` and renamed to ``step-N/`` only when complete, so a killed
process never leaves a checkpoint that looks whole. It holds:

- what ``accelerator.save_state`` writes: the student (``model.safetensors``; under FSDP a sharded
  ``pytorch_model_fsdp_0/`` directory), the optimizer, the LR scheduler, the gradient scaler (fp16) and
  one RNG file per process (``random_states_R.pkl``: python, numpy and torch generators, so dropout
  continues with the same masks);
- ``trainer_state.pt``: the step, the curriculum sampler, every strategy's ``state_dict()``
  (scorer scores, pacing, reliance, divergence), the :class:`~kdcore.training.engine.History` (difficulty
  snapshots, λ sums, eval curve, token and time counters, the partly filled log window);
- ``checkpoint.json``, written last: the step, the number of processes, the backend (DDP, FSDP and its
  state format, DeepSpeed), the student's dropout, the resolved run config and its fingerprint, the size
  of ``metrics.jsonl`` at that step, and the size and SHA-256 of every other file (subdirectories
  included), so a damaged checkpoint (a file missing, truncated or altered) is recognised.

The newest ``output.keep_checkpoints`` are kept. ``kd run --resume DIR`` takes the newest checkpoint
that passes these checks (a damaged one is reported and skipped), refuses one written with another
config (naming the first field that differs) or another backend, truncates ``metrics.jsonl`` to the
checkpoint and continues; the result is bit-for-bit the uninterrupted run's. Another number of processes
is accepted without dropout (equal up to float rounding) and refused with it (:func:`check_layout`).

Nothing in a checkpoint runs code when it is loaded: ``trainer_state.pt`` and accelerate's
``optimizer.bin``, ``scheduler.bin``, ``scaler.pt`` and ``random_states_R.pkl`` are pickles, and every
one of them goes through torch's weights-only unpickler (tensors, plain Python values and numpy
arrays; :func:`safe_load`) before anything is restored. A pickle that asks for anything else, such as
a crafted ``__reduce__``, makes the checkpoint damaged; the SHA-256 in ``checkpoint.json`` cannot
vouch for it, since whoever edits a file can edit its hash. FSDP's sharded state holds tensors, which
torch reads with that unpickler, and a ``.metadata`` index, which it reads with plain pickle: kdcore
first unpickles it allowing only the index's own classes (:func:`check_sharded_index`). DeepSpeed
loads its checkpoint files with plain pickle too: kdcore does not resume them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from kdcore.errors import KdError, PluginError
from kdcore.files import default_permissions, file_sha256
from kdcore.summary import SUMMARY_FILE

if TYPE_CHECKING:
    from accelerate import Accelerator

    from kdcore.config import RunConfig

CHECKPOINTS = "checkpoints"
META = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT = 2  # 2: the backend and the student's dropout recorded, files in subdirectories (FSDP) hashed
_STEP_DIR = re.compile(r"^step-(\d+)$")

#: Config fields that do not change what a run computes; a checkpoint may differ from the run in them.
#: (A sharded teacher gathers the same weights it would hold replicated: its logits are identical.)
NEUTRAL_FIELDS = (
    "output.",
    "training.checkpoint_every",
    "training.on_nonfinite",
    "training.teacher_placement",
)


def check_resumable(run_dir: Path) -> None:
    """``run_dir`` holds a run that has not finished, or a KdError saying why it cannot be resumed."""
    if not (run_dir / "config.yaml").is_file():
        raise KdError(
            f"'{run_dir}' is not a run directory (it has no config.yaml); --resume takes the directory "
            "a kd run wrote"
        )
    if (run_dir / SUMMARY_FILE).exists():
        raise KdError(f"'{run_dir}' holds a finished run (it has {SUMMARY_FILE}); there is nothing to resume")


def resume_config(run_dir: Path) -> RunConfig:
    """The config a run directory was started with, pointed at that directory."""
    from kdcore.config import resolve_config

    check_resumable(run_dir)
    return resolve_config(run_dir / "config.yaml", {"output.dir": str(run_dir)})


class CheckpointDamaged(KdError):
    """A checkpoint directory whose files are missing, truncated or altered."""


# -- config comparison -------------------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def relevant_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that decide the result, flattened to dotted names."""
    return {k: v for k, v in _flatten(config).items() if not k.startswith(NEUTRAL_FIELDS)}


def fingerprint(config: Mapping[str, Any]) -> str:
    text = json.dumps(relevant_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def first_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """``"training.lr=0.003, the run has 0.001"`` for the first differing field, or None.

    A field the checkpoint does not know (added to kdcore since) counts as its default value.
    """
    from kdcore.config import RunConfig

    old, new = relevant_config(saved), relevant_config(current)
    defaults = relevant_config(RunConfig().to_dict())
    missing = object()
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key, defaults.get(key, missing)), new.get(key, missing)
        if a == b:
            continue
        if a is missing:
            return f"no {key} (the run has {key}={_show(b)})"
        if b is missing:
            return f"{key}={_show(a)}, which the run does not have"
        return f"{key}={_show(a)}, the run has {_show(b)}"
    return None


# -- files ---------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _is_int(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _meta_problem(path: Path, meta: Any) -> str | None:
    """What is wrong with the fields of ``checkpoint.json`` that resuming reads, or None.

    A value of the wrong type is damage like a truncated file: the checkpoint is skipped, never read.
    """
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    found = _STEP_DIR.match(path.name)
    step = int(found.group(1)) if found else None
    if not _is_int(meta.get("format"), 1):
        return f"its format is {json.dumps(meta.get('format'))}, not a number from 1 to {FORMAT}"
    if meta.get("step") != step or not _is_int(meta.get("step")):
        return f"its step is {json.dumps(meta.get('step'))} in a directory named {path.name}"
    files = meta.get("files")
    if not isinstance(files, dict):
        return "its files are not a mapping of file names"
    for name, info in files.items():
        if not (
            isinstance(info, dict) and _is_int(info.get("bytes")) and isinstance(info.get("sha256"), str)
        ):
            return f"the entry of {name} is {json.dumps(info)}, not its bytes and sha256"
    if not _is_int(meta.get("world_size", 1), 1):
        return f"its world_size is {json.dumps(meta.get('world_size'))}, not a number of processes"
    backend = meta.get("backend", {})
    if not (isinstance(backend, dict) and isinstance(backend.get("type", "ddp"), str)):
        return f"its backend is {json.dumps(backend)}, not a mapping with a type"
    if not _is_int(meta.get("metrics_bytes")):
        return f"its metrics_bytes is {json.dumps(meta.get('metrics_bytes'))}, not a size"
    if not isinstance(meta.get("config", {}), dict):
        return "its config is not a mapping"
    return None


def _check_safetensors(file: Path, path: Path) -> None:
    """Every tensor of ``file`` can be located (the header parses and covers the file), or damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as exc:
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointDamaged(
            f"checkpoint {path} is damaged: {file.relative_to(path).as_posix()} cannot be read ({problem})"
        ) from None


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, or :class:`CheckpointDamaged` saying what is wrong with it."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, RecursionError):
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {META} is not valid") from None
    problem = _meta_problem(path, meta)
    if problem is not None:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {META} is not valid ({problem})")
    if meta["format"] > FORMAT:
        raise KdError(
            f"checkpoint {path} has format {meta['format']}, written by a newer kdcore (this one reads "
            f"formats 1 to {FORMAT}); resume it with that kdcore, or upgrade kdcore"
        )
    files = meta["files"]
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointDamaged(
                f"checkpoint {path} is damaged: {name} has {size} bytes, {info['bytes']} were written"
            )
        if file_sha256(file) != info["sha256"]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {name} does not match its checksum")
    if meta.get("backend", {}).get("type") == "deepspeed":
        raise KdError(
            f"checkpoint {path} was written under DeepSpeed, which loads its files with a pickle that can "
            "run code, so kdcore does not resume it; start a new run (its files stay in the checkpoint)"
        )
    # Every pickle accelerate.load_state or read_state will open, listed in checkpoint.json or not.
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.name != META):
        if file.suffix != ".safetensors":
            safe_load(file, path, mmap=True)  # mmap: the pickle is checked, the tensors are not read
        else:  # a hash rewritten with the file proves nothing: the header must parse
            _check_safetensors(file, path)
    # FSDP's sharded state: torch reads the tensors with its weights-only unpickler, the index with pickle
    for file in sorted(path.glob("*/.metadata")):
        check_sharded_index(file, path)
    return meta


def processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def check_layout(
    path: Path, meta: Mapping[str, Any], layout: Mapping[str, Any], warn: Callable[[str], None]
) -> None:
    """A KdError when checkpoint ``path`` cannot continue under ``layout`` (this run's backend and
    process count, :func:`kdcore.training.parallel.backend`); a note through ``warn`` when it can,
    but only up to float rounding.

    Another process count is fine for DDP and FSDP without dropout: the weights and optimizer are
    saved whole (DDP) or resharded on load (FSDP's distributed checkpoint), and batches, curriculum
    and λ do not depend on it. Dropout masks are drawn per process, so they cannot be continued.
    """
    from kdcore.training.parallel import describe

    run_dir = path.parent.parent
    saved_backend = {"type": "ddp", **meta.get("backend", {})}  # format 1: DDP or one process
    saved_world, world = int(meta.get("world_size", 1)), int(layout["world_size"])
    ours = {k: v for k, v in layout.items() if k != "world_size"}
    if saved_backend != ours:
        how = (
            f"without the accelerate config (torchrun --nproc_per_node N -m kdcore run --resume {run_dir})"
            if saved_backend["type"] == "ddp"
            else "with the accelerate config it was written with (accelerate launch --config_file CONFIG "
            f"-m kdcore run --resume {run_dir})"
        )
        raise KdError(
            f"checkpoint {path} was written under {describe(saved_backend)} and this run uses "
            f"{describe(ours)}, whose checkpoint files differ; resume it {how}"
        )
    if saved_world == world:
        return
    same = (
        f"resume with {processes(saved_world)} (accelerate launch --num_processes {saved_world} -m kdcore "
        f"run --resume {run_dir})"
    )
    written = f"checkpoint {path} was written by {processes(saved_world)} and this run has {world}"
    if "dropout" not in meta:
        raise KdError(f"{written}, and it does not record whether the student uses dropout; {same}")
    if meta["dropout"]:
        raise KdError(
            f"{written}; the student uses dropout ({meta['dropout']}), whose masks are drawn per process, "
            f"so the continued run could not match an uninterrupted one; {same}"
        )
    warn(
        f"{written}: continuing, with a result equal to the uninterrupted run's up to float rounding "
        "(not bit for bit)"
    )


def find_checkpoint(
    run_dir: Path, config: Mapping[str, Any], layout: Mapping[str, Any], warn: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint of ``run_dir`` for this config, or None when there is none at all.

    A damaged checkpoint is reported through ``warn`` and the previous one tried; a checkpoint
    written with another config, or that this backend and process count cannot continue
    (:func:`check_layout`), is refused with a :class:`KdError`.
    """
    candidates = step_dirs(run_dir / CHECKPOINTS)
    problems = []
    for _, path in candidates:
        try:
            meta = verify(path)
        except CheckpointDamaged as exc:
            problems.append(str(exc))
            warn(f"{exc}; trying the previous checkpoint")
            continue
        difference = first_difference(meta.get("config", {}), config)
        if difference is not None:
            raise KdError(
                f"checkpoint {path} was written with {difference}; resume with the config it was "
                f"written with ({run_dir / 'config.yaml'}), or start a new run"
            )
        check_layout(path, meta, layout, warn)
        return path, meta
    if problems:
        raise KdError(
            f"no valid checkpoint in {run_dir / CHECKPOINTS} ({'; '.join(problems)}); remove that "
            "directory to start the run again from step 0"
        )
    return None


def truncate_metrics(path: Path, size: int) -> list[dict[str, Any]]:
    """Cut ``metrics.jsonl`` back to ``size`` bytes (what it held at the checkpoint); its records."""
    if path.exists():
        with path.open("r+b") as handle:
            handle.truncate(min(size, path.stat().st_size))
    elif size:
        raise KdError(f"{path} is missing; the checkpoint expects {size} bytes of metrics in it")
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- plugins ---------------------------------------------------------------------------------------------
def check_plugins(run_dir: Path, warn: Callable[[str], None]) -> None:
    """Every strategy recorded in ``strategies.yaml`` is installed, or a PluginError naming the package."""
    from kdcore.plugins import get_registry

    path = run_dir / "strategies.yaml"
    if not path.is_file():
        raise KdError(
            f"'{path}' is missing, so the strategies and plugin versions this run used cannot be checked; "
            "restore it, or start a new run"
        )
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
        problem = None if isinstance(recorded, dict) else "it is not a mapping of strategy kinds"
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if problem is not None:
        raise KdError(
            f"'{path}' is damaged ({problem}), so the strategies and plugin versions this run used cannot "
            "be checked; restore it, or start a new run"
        )
    registry = get_registry()
    for kind, meta in recorded.items():
        if not isinstance(meta, Mapping) or "name" not in meta:
            continue
        dist, version = meta.get("distribution", "?"), meta.get("version", "")
        try:
            entry = registry.entry(kind, meta["name"])
        except PluginError as exc:
            raise PluginError(
                f"this run used {kind} '{meta['name']}' from {dist} {version}, which is not available "
                f"here ({exc}); pip install {dist}, then resume"
            ) from None
        if version and entry.version != version:
            warn(
                f"{kind} '{meta['name']}' was provided by {dist} {version} and is now {entry.distribution} "
                f"{entry.version}; the resumed run may not match an uninterrupted one"
            )


# -- writing ----------------------------------------------------------------------------------------------
class Checkpointer:
    """Writes and prunes ``RUN_DIR/checkpoints/step-N/``; every process calls :meth:`save`."""

    def __init__(
        self,
        run_dir: Path,
        every: int | None,
        keep: int,
        config: Mapping[str, Any],
        metrics_path: Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.every, self.keep = every, keep
        self.config = dict(config)
        self.metrics_path = metrics_path
        #: the newest checkpoint written or resumed from (the "last good" one)
        self.last: Path | None = None
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != self.last_step

    def save(
        self, accelerator: Accelerator, state: Mapping[str, Any], step: int, layout: Mapping[str, Any]
    ) -> Path:
        """Write checkpoint ``step-<step>`` atomically; collective over all processes.

        ``layout``: the backend, process count and the student's dropout (compared on resume).
        """
        import torch

        final, tmp = self.root / f"step-{step}", self.root / f".step-{step}.tmp"
        main = accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        noisy = logging.getLogger("accelerate.utils.other")  # "Removed shared tensor": tied weights, fine
        level, noisy.level = noisy.level, logging.ERROR
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)  # RNG files come from every process
        finally:
            noisy.setLevel(level)
        accelerator.wait_for_everyone()
        if main:
            buffer = io.BytesIO()
            torch.save(dict(state), buffer)
            check_storable(state, buffer.getvalue())
            (tmp / TRAINER_STATE).write_bytes(buffer.getvalue())
            files = {}  # FSDP's sharded state is a directory per model and optimizer
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                _fsync(file)
                name = file.relative_to(tmp).as_posix()
                files[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
            meta = {
                "format": FORMAT,
                "step": step,
                "world_size": layout["world_size"],
                "backend": {k: v for k, v in layout.items() if k not in ("world_size", "dropout")},
                "dropout": layout["dropout"],
                "config_fingerprint": fingerprint(self.config),
                "metrics_bytes": self.metrics_path.stat().st_size
                if self.metrics_path and self.metrics_path.exists()
                else 0,
                "config": self.config,
                "files": files,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
            _fsync(tmp / META)
            default_permissions(tmp)  # accelerate's safetensors file is 0600 otherwise
            if final.exists():  # e.g. a damaged step-N left by an earlier attempt
                old = self.root / f".step-{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            self.prune()
        accelerator.wait_for_everyone()
        self.last, self.last_step = final, step
        return final

    def prune(self) -> None:
        for _, path in step_dirs(self.root)[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        for leftover in self.root.glob(".step-*.tmp"):  # from a process killed while writing
            shutil.rmtree(leftover, ignore_errors=True)

    def resumed_from(self, path: Path, step: int, main_process: bool = True) -> None:
        """Record the checkpoint a resumed run starts from; newer (damaged) ones are removed."""
        self.last, self.last_step = path, step
        for newer_step, newer in step_dirs(self.root) if main_process else []:
            if newer_step > step:
                shutil.rmtree(newer, ignore_errors=True)


def _allowed_globals() -> list[Any]:
    """What the weights-only unpickler may build besides tensors and plain values: numpy arrays (the
    numpy generator state in accelerate's RNG files; accelerate loads them with the same list)."""
    import codecs

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def safe_load(file: Path | IO[bytes], checkpoint: Path | None = None, *, mmap: bool = False) -> Any:
    """``torch.load`` through torch's weights-only unpickler, or :class:`CheckpointDamaged`.

    A pickle can name any function to call while it loads; this one builds only tensors, plain Python
    values and numpy arrays, and refuses a file that asks for anything else without running it.
    """
    import pickle

    import torch

    name = getattr(file, "name", "the state")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"calls {found.group(1)}" if found else "holds more than tensors and plain values"
        problem = f"{name} {what} when loaded, which no checkpoint does, so it was not loaded"
    except Exception as exc:
        problem = f"{name} cannot be read ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})"
    raise CheckpointDamaged(f"checkpoint {checkpoint} is damaged: {problem}" if checkpoint else problem)


#: What torch's distributed checkpoint (FSDP's sharded state) pickles into its ``.metadata`` index.
_INDEX_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


def check_sharded_index(file: Path, checkpoint: Path) -> None:
    """:class:`CheckpointDamaged` unless ``file`` (a distributed checkpoint's ``.metadata``, which torch
    loads with plain pickle) names only the index's own classes, torch dtypes and sizes."""
    import pickle

    import torch

    class IndexUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            known = name in _INDEX_GLOBALS.get(module, ()) or (
                module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
            )
            if not known:
                raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
            return super().find_class(module, name)

    name = file.relative_to(checkpoint).as_posix()
    try:
        with file.open("rb") as handle:
            IndexUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointDamaged(
            f"checkpoint {checkpoint} is damaged: {name} calls {str(exc).removeprefix('GLOBAL ')} when "
            "loaded, which no checkpoint does, so it was not loaded"
        ) from None
    except Exception as exc:
        raise CheckpointDamaged(
            f"checkpoint {checkpoint} is damaged: {name} cannot be read ({exc})"
        ) from None


def check_storable(state: Mapping[str, Any], data: bytes) -> None:
    """``data`` (``state`` saved by torch) loads back through :func:`safe_load`, or a KdError naming the
    strategy whose ``state_dict()`` holds something else."""
    import torch

    try:
        safe_load(io.BytesIO(data))
        return
    except CheckpointDamaged as exc:
        problem = str(exc)
    for kind, part in state.get("strategies", {}).items():
        buffer = io.BytesIO()
        torch.save(part, buffer)
        try:
            safe_load(io.BytesIO(buffer.getvalue()))
        except CheckpointDamaged as exc:
            problem = f"the {kind}'s state_dict(): {exc}"
            break
    raise KdError(
        f"cannot write a checkpoint that loads safely ({problem}); a strategy's state_dict() must hold only "
        "tensors, numpy arrays and plain Python values (docs/plugins.md)"
    )


def read_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a verified checkpoint, through the weights-only unpickler; its step is
    the directory's."""
    state = safe_load(path / TRAINER_STATE, path)
    found = _STEP_DIR.match(path.name)
    if not isinstance(state, dict) or found is None or state.get("step") != int(found.group(1)):
        step = state.get("step") if isinstance(state, dict) else None
        raise CheckpointDamaged(
            f"checkpoint {path} is damaged: {TRAINER_STATE} holds step {_show(step)}; remove the checkpoint "
            "to resume from the previous one"
        )
    return state


# -- graceful stop ----------------------------------------------------------------------------------------
class GracefulStop:
    """While active, SIGINT and SIGTERM only set a flag: the loop finishes its step, checkpoints, stops.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. ``hold_after_stop``: a process
    that exits after the stop (``kd run``) ignores later signals instead of restoring the previous
    handlers, so a late Ctrl-C cannot interrupt its shutdown (it arrives after the loop has ended).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, hold_after_stop: bool = False) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.hold_after_stop = hold_after_stop
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulStop:
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        hold = self.hold_after_stop and self.signum is not None
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if hold else handler)
        self._previous.clear()

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal to stop for; with several processes, one that got a signal stops them all."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item()) or None
