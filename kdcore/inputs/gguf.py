"""Models and tokenizers from GGUF files (llama.cpp's format), through transformers' GGUF support.

Sources, as a user writes them for ``--teacher``/``--student``/``--model``:

- ``path/to/model.gguf``: a local file;
- ``DIR:model.gguf``: a file inside a local directory;
- ``org/repo:model.gguf`` (or ``org/repo:sub/model.gguf``): a file in a Hugging Face hub repository.

Loading needs the ``gguf`` package (``pip install "kdcore[gguf]"``). transformers de-quantises every
tensor to float32 (or ``dtype``). A model loaded that way carries a GGUF quantisation config and
refuses ``save_pretrained``, and training code that checks ``is_quantized`` treats it as frozen;
:func:`plain_model` turns it into an ordinary model of the same config sharing the same tensors, and
:func:`load_gguf_model` always returns that plain model, so a GGUF teacher or student saves like any
other. Loading is quiet (no transformers or gguf progress bars) and says one line through ``echo``.

De-quantising is slow (about a minute for a 135M-parameter model on two CPU cores), so kdcore
does it once per file: :func:`converted_directory` saves the plain model and its tokenizer with
``save_pretrained`` under ``<cache root>/gguf/<first 16 hex digits of the file's SHA-256>/``
(written atomically, under a file lock so that two runs convert a file once), and every later
load reads that directory. A hub file is downloaded into the Hugging Face cache first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.errors import KdError
from kdcore.files import atomic_directory, atomic_write_json, cache_root, file_sha256

__all__ = [
    "GgufSource",
    "converted_directory",
    "is_gguf_model",
    "load_gguf",
    "load_gguf_config",
    "load_gguf_model",
    "load_gguf_tokenizer",
    "local_file",
    "parse_gguf_source",
    "plain_model",
]

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = 'pip install "kdcore[gguf]"'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FORMS = "a local file.gguf, DIR:file.gguf or a hub org/repo:file.gguf"


@dataclass(frozen=True)
class GgufSource:
    """Where a GGUF file lives: a local directory or a hub repository, and the file's name in it."""

    location: str
    filename: str
    local: bool

    def __str__(self) -> str:
        if self.local:
            return str(Path(self.location) / self.filename)
        return f"{self.location}:{self.filename}"

    @property
    def name(self) -> str:
        """The file's base name (what a progress line shows)."""
        return Path(self.filename).name


def parse_gguf_source(source: str) -> GgufSource | None:
    """The GGUF file ``source`` names, or None when it names no ``.gguf`` file (a directory, even one named
    ``x.gguf``, a hub id, a spec).

    Checked before a model spec (``type:key=value``): ``org/repo:file.gguf`` would otherwise read as
    a spec of model type ``org/repo``. Whether a local file exists is checked at load time.
    """
    source = source.strip()
    if not source.lower().endswith(".gguf"):
        return None
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():  # save_pretrained's, whatever its name
        return None
    if path.is_dir():
        inside = sorted(path.glob("*.gguf"))
        example = f" such as '{inside[0]}'" if inside else ""
        raise KdError(
            f"'{source}' is a directory, not a GGUF file; pass the .gguf file itself{example}, or a "
            "save_pretrained directory"
        )
    if path.is_file() or ":" not in source:
        return GgufSource(str(path.parent), path.name, local=True)
    where, _, filename = source.rpartition(":")
    if not where or not filename or filename.lower() == ".gguf":
        raise KdError(f"'{source}' names no GGUF file; write {_FORMS}")
    if Path(where).is_dir():
        return GgufSource(where, filename, local=True)
    if _HUB_ID.match(where):
        return GgufSource(where, filename, local=False)
    raise KdError(
        f"'{where}' in '{source}' is neither a local directory nor a hub repository id; write {_FORMS}"
    )


def _as_source(source: str | GgufSource) -> GgufSource:
    if isinstance(source, GgufSource):
        return source
    parsed = parse_gguf_source(source)
    if parsed is None:
        raise KdError(f"'{source}' is not a GGUF file name; write {_FORMS}")
    return parsed


def require_gguf(what: str) -> None:
    """One sentence instead of transformers' ImportError when the ``gguf`` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise KdError(f"loading '{what}' needs the gguf package; install it with {INSTALL_HINT}") from None


def _check_local(source: GgufSource) -> None:
    path = Path(source.location) / source.filename
    if not path.is_file():
        raise KdError(
            f"GGUF file '{path}' does not exist; check the path (a file on the Hugging Face hub is "
            "written org/repo:file.gguf)"
        )
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise KdError(
            f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
            "model file or a save_pretrained directory"
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No transformers logging below errors and no progress bars, restored afterwards.

    transformers' de-quantisation loop uses ``tqdm.auto`` directly rather than its own switchable
    bars, so its module-level ``tqdm`` is replaced by a disabled one for the duration; reading the
    tensor-name map of every sub-module rebuilds the same map hundreds of times, so it is memoised
    for the duration too (about a third of the load time of a 30-layer model).
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    patches = [(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))]
    try:
        import gguf

        patches.append((gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)))
    except ImportError:
        pass
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def local_file(source: str | GgufSource) -> Path:
    """The GGUF file on this machine: a local one as given (checked), a hub one downloaded into the Hugging
    Face cache (once; offline, the cached copy)."""
    source = _as_source(source)
    if source.local:
        _check_local(source)
        return Path(source.location) / source.filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.location, source.filename))
    except Exception as exc:  # not found, offline without a cached copy, gated repository
        raise KdError(
            f"could not download '{source.filename}' from hub repository '{source.location}' "
            f"({_first_line(exc)}); check the repository and file name, or download the file and pass its path"
        ) from None


def _load(source: GgufSource, loader: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    """``loader(directory, gguf_file=name)`` on the local file (a hub file downloaded first), every failure
    turned into one sentence."""
    require_gguf(str(source))
    path = local_file(source)
    try:
        with _quiet_loading():
            return loader(str(path.parent), gguf_file=path.name, **kwargs)
    except KdError:
        raise
    except ImportError:
        raise KdError(f"loading '{source}' needs the gguf package; install it with {INSTALL_HINT}") from None
    except OSError as exc:
        raise KdError(f"could not read the {what} in GGUF file '{source}': {_first_line(exc)}") from None
    except Exception as exc:  # a corrupt file or an architecture transformers cannot map
        raise KdError(
            f"transformers could not load the {what} from GGUF file '{source}' ({_first_line(exc)}); the "
            "file may be truncated or hold an architecture transformers cannot read from GGUF: download it "
            "again or pass a save_pretrained directory"
        ) from None


def is_gguf_model(model: Any) -> bool:
    """True for a model loaded by transformers from GGUF (it refuses ``save_pretrained``)."""
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower().endswith("gguf")


def plain_model(model: Any) -> Any:
    """An ordinary model of the same config and class sharing ``model``'s tensors; ``model`` itself if plain.

    The GGUF quantisation config is dropped, so the result saves with ``save_pretrained`` and trains
    like any model; no tensor is copied (tied embeddings stay tied).
    """
    if not is_gguf_model(model):
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with _quiet_loading():
        plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict())
    plain.train(model.training)
    return plain


def load_gguf_model(
    source: str | GgufSource, *, dtype: Any = None, echo: Callable[[str], None] | None = None
) -> Any:
    """A plain causal LM (see :func:`plain_model`) from a GGUF source; ``echo`` gets one line.

    ``dtype`` (a torch dtype) is what the weights are de-quantised to; None keeps float32.
    """
    from transformers import AutoModelForCausalLM

    source = _as_source(source)
    if echo is not None:
        where = source.location if source.local else f"hub repository {source.location}"
        echo(f"Loading {source.name} from {where} (GGUF, de-quantised to {_dtype_name(dtype)})")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = _load(source, AutoModelForCausalLM.from_pretrained, "model", **kwargs)
    return plain_model(model)


def load_gguf_config(source: str | GgufSource) -> Any:
    """The model's config from the file's metadata, without de-quantising weights (for a dry run)."""
    from transformers import AutoConfig

    config = _load(_as_source(source), AutoConfig.from_pretrained, "config")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_gguf_tokenizer(source: str | GgufSource) -> Any:
    """The tokenizer described by a GGUF file's metadata (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    return _load(_as_source(source), AutoTokenizer.from_pretrained, "tokenizer")


def load_gguf(
    source: str | GgufSource, *, dtype: Any = None, echo: Callable[[str], None] | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from one GGUF source; ``echo`` gets one line before the (slow) load."""
    source = _as_source(source)
    model = load_gguf_model(source, dtype=dtype, echo=echo)
    return model, load_gguf_tokenizer(source)


def _dtype_name(dtype: Any) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


#: Written last into a converted directory: the source, its SHA-256, when and how long it took.
CONVERTED_MARKER = "kdcore_gguf.json"


def converted_directory(
    source: str | GgufSource, *, convert: bool = True, echo: Callable[[str], None] | None = None
) -> Path | None:
    """The ``save_pretrained`` directory holding ``source`` converted to a plain model and its tokenizer.

    Converts the file the first time (``convert``; else returns None when it has not been converted
    yet); ``echo`` gets one line either way.
    """
    source = _as_source(source)
    path = local_file(source)
    digest = file_sha256(path)
    directory = cache_root() / "gguf" / digest[:16]
    if not (directory / CONVERTED_MARKER).is_file():
        if not convert:
            return None
        from filelock import FileLock

        directory.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{directory}.lock"):
            if not (
                directory / CONVERTED_MARKER
            ).is_file():  # another process may have converted it meanwhile
                _convert(
                    GgufSource(str(path.parent), path.name, local=True), str(source), digest, directory, echo
                )
                return directory
    _check_converted(directory, source)
    if echo is not None:
        echo(f"Loading {source.name} from its converted copy in {directory}")
    return directory


def _check_converted(directory: Path, source: GgufSource) -> None:
    """A converted copy whose config or weights cannot be read (a disk filled up, a file cut) is named as
    the cache entry it is, to delete; each weights file's header is read, not its tensors."""
    from safetensors import SafetensorError, safe_open

    problem = None if (directory / "config.json").is_file() else "config.json is missing"
    for file in sorted(directory.glob("*.safetensors")) if problem is None else []:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            problem = f"{file.name}: {_first_line(exc)}"
            break
    if problem is not None:
        raise KdError(
            f"the converted copy of {source.name} in {directory} is damaged ({problem}); delete that "
            "directory, and the next run converts the GGUF file again"
        )


def _convert(
    source: GgufSource, name: str, digest: str, directory: Path, echo: Callable[[str], None] | None
) -> None:
    """De-quantise ``source`` to float32 and save it with its tokenizer into ``directory`` (atomically)."""
    if echo is not None:
        echo(
            f"Converting {source.name} (GGUF, de-quantised to float32) once; later runs load it from {directory}"
        )
    start = time.perf_counter()
    model, tokenizer = load_gguf(source)
    with atomic_directory(directory) as tmp, _quiet_loading():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds = round(time.perf_counter() - start, 1)
        atomic_write_json(tmp / CONVERTED_MARKER, {"source": name, "sha256": digest, "seconds": seconds})
