"""Loading teachers and students: a hub id, a local ``save_pretrained`` directory, a GGUF file, or a spec.

A spec builds a model from scratch from an ``AutoConfig`` model type and keyword overrides,
e.g. ``gpt2:n_layer=2,n_embd=64,n_head=2``. Hub loading is the ordinary
``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code`` off unless asked). A GGUF source
(``model.gguf``, ``DIR:model.gguf``, ``org/repo:model.gguf``, see :mod:`kdcore.inputs.gguf`) is
converted once into a cached ``save_pretrained`` directory and loaded from there. A student may
also be cut from the teacher (``from-teacher:num_layers=4``, see :mod:`kdcore.inputs.cut`); the
run builds it, since it needs the teacher's weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdcore.config import load_yaml
from kdcore.errors import KdError
from kdcore.inputs.cut import parse_cut_spec
from kdcore.inputs.gguf import (
    GgufSource,
    converted_directory,
    load_gguf_config,
    load_gguf_tokenizer,
    parse_gguf_source,
)


@dataclass(frozen=True)
class ModelSpec:
    """A from-scratch model: ``model_type`` plus ``AutoConfig`` overrides."""

    model_type: str
    overrides: dict[str, Any]

    def config(self, vocab_size: int, **extra: Any):
        from transformers import AutoConfig

        kwargs = {"vocab_size": vocab_size, **extra, **self.overrides}
        return AutoConfig.for_model(self.model_type, **kwargs)


def parse_spec(source: str) -> ModelSpec | None:
    """``gpt2:n_layer=2,n_embd=64`` → ModelSpec; a hub id, a path, a GGUF source or a cut → None.

    GGUF sources and cuts are recognised first (``org/repo:file.gguf`` is no spec of model type
    ``org/repo``), and a malformed cut (``from-teacher:layer=3``) fails here, as a spec typo does.
    """
    if ":" not in source or Path(source).exists():
        return None
    if parse_gguf_source(source) is not None or parse_cut_spec(source) is not None:
        return None
    model_type, _, rest = source.partition(":")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        known = ", ".join(k for k in ("gpt2", "llama", "qwen2", "gpt_neox", "mistral") if k in CONFIG_MAPPING)
        raise KdError(
            f"unknown model type '{model_type}' in spec '{source}'; use an AutoConfig model type such as {known}"
        )
    overrides: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in part:
            raise KdError(
                f"bad model spec '{source}': '{part}' is not key=value (e.g. gpt2:n_layer=2,n_embd=64)"
            )
        key, raw = part.split("=", 1)
        try:
            overrides[key.strip()] = load_yaml(raw)
        except yaml.YAMLError:
            overrides[key.strip()] = raw  # refused by the field's own type check below
    check_spec_overrides(CONFIG_MAPPING[model_type], overrides, source)
    return ModelSpec(model_type, overrides)


def check_sources(teacher: str, student: str) -> None:
    """Parse both sources, so that a typo in a spec or a cut fails before anything loads; a cut
    (``from-teacher:...``) names a student only."""
    if parse_cut_spec(teacher) is not None:
        raise KdError(
            f"'{teacher}' describes a student cut from the teacher; pass it as --student and the teacher as "
            "a hub id, directory, GGUF file or spec"
        )
    for source in (teacher, student):
        parse_spec(source)


def config_keys(config_class: type) -> set[str]:
    """The keyword names a config class accepts: its fields or ``__init__`` parameters, their aliases
    (``attribute_map``, e.g. ``hidden_size`` for GPT-2's ``n_embd``) and the common config attributes."""
    import dataclasses
    import inspect

    keys = set(getattr(config_class, "attribute_map", None) or {})
    if dataclasses.is_dataclass(config_class):
        keys |= {f.name for f in dataclasses.fields(config_class)}
    keys |= {
        name
        for name, param in inspect.signature(config_class.__init__).parameters.items()
        if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }
    keys |= set(config_class().to_dict())
    return {key for key in keys if not key.startswith("_")}


def check_spec_overrides(config_class: type, overrides: dict[str, Any], source: str) -> None:
    """Refuse a key the config does not have (it would be stored and ignored) and a value of the wrong
    type, with one sentence: a spec typo must not silently build another model."""
    import difflib

    known = config_keys(config_class)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else f"see the fields of transformers.{config_class.__name__}"
            )
            raise KdError(f"model spec '{source}' has an unknown key '{key}'; {hint}")
    try:
        config_class(**overrides)
    except Exception as exc:  # strict config fields raise their own error types (huggingface_hub)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = re.sub(r"^\w+Error: ", "", lines[-1])
        raise KdError(
            f"bad value in model spec '{source}': {reason}; e.g. gpt2:n_layer=2,n_embd=64"
        ) from None


def remote_code_warning(teacher: str | None, student: str | None, trust_remote_code: bool) -> str | None:
    """One line naming the models whose own Python code will run (``model.trust_remote_code``), or None.

    A spec is built by transformers itself; ``teacher`` is None when a teacher cache replaces it.
    """
    if not trust_remote_code:
        return None
    sources = [s for s in dict.fromkeys((teacher, student)) if s is not None and parse_spec(s) is None]
    if not sources:
        return None
    names = " and ".join(f"'{s}'" for s in sources)
    return (
        f"warning: model.trust_remote_code is on: the Python code that comes with {names} will run on "
        "this machine"
    )


def model_config(source: str, *, trust_remote_code: bool = False) -> Any | None:
    """The config of a spec, directory, hub id or GGUF file without loading weights; None when it cannot
    be read (then loading the model says why) and for a cut (the teacher's positions are its own)."""
    from transformers import AutoConfig

    spec = parse_spec(source)
    if spec is not None:
        return AutoConfig.for_model(spec.model_type, **spec.overrides)
    if parse_cut_spec(source) is not None:
        return None
    gguf = parse_gguf_source(source)
    if gguf is not None:
        try:
            return load_gguf_config(gguf)
        except KdError:
            return None
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def position_limit(config: Any) -> int | None:
    """How many positions a model embeds (GPT-2's ``n_positions``, ``max_position_embeddings``), if known."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_seq_len(seq_len: int, config: Any | None, role: str, source: str) -> None:
    """Refuse samples longer than the model's positions: they fail inside its forward pass."""
    limit = position_limit(config) if config is not None else None
    if limit is not None and seq_len > limit:
        raise KdError(
            f"data.seq_len {seq_len} is longer than the {limit} positions {role} '{source}' accepts; lower "
            f"--seq-len to at most {limit}"
        )


def is_local(source: str) -> bool:
    return Path(source).is_dir()


def load_pretrained(
    source: str, *, trust_remote_code: bool = False, echo: Callable[[str], None] | None = None
) -> Any:
    """A causal LM from a local directory, the Hugging Face hub or a GGUF file (``echo`` gets its one line)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    gguf = parse_gguf_source(source)
    if gguf is not None:
        source = str(converted_directory(gguf, echo=echo))
    try:
        return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as exc:
        raise KdError(_not_found(source, exc)) from None


def _readable_source(source: str) -> str | GgufSource:
    """What to read a tokenizer or config from: a GGUF file's converted copy when there is one, the GGUF
    file itself when there is none (no conversion just for a config or vocabulary), else ``source``."""
    gguf = parse_gguf_source(source)
    if gguf is None:
        return source
    directory = converted_directory(gguf, convert=False)
    return gguf if directory is None else str(directory)


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a directory, hub id or GGUF file (from its converted copy when there is one)."""
    from transformers import AutoTokenizer

    readable = _readable_source(source)
    if isinstance(readable, GgufSource):
        return load_gguf_tokenizer(readable)
    try:
        return AutoTokenizer.from_pretrained(readable, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdError(_not_found(readable, exc, what="tokenizer")) from None


def pretrained_config(source: str, *, trust_remote_code: bool = False) -> Any:
    """The config of a directory, hub id or GGUF file, without loading weights (for a dry run)."""
    from transformers import AutoConfig

    readable = _readable_source(source)
    if isinstance(readable, GgufSource):
        return load_gguf_config(readable)
    try:
        return AutoConfig.from_pretrained(readable, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdError(_not_found(readable, exc, what="model config")) from None


def _not_found(source: str, exc: Exception, what: str = "model") -> str:
    """One sentence for a model, tokenizer or config that did not load, with the fix when it is known."""
    from safetensors import SafetensorError

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "trust_remote_code" in str(exc):
        return (
            f"'{source}' needs its own Python code to load (custom code in its repository); pass "
            "--trust-remote-code (model.trust_remote_code: true) if you trust that code"
        )
    if isinstance(exc, SafetensorError):
        return (
            f"the weights of '{source}' are damaged or incomplete ({first}); save or download the model again"
        )
    if what == "model" and "no file named" in first:
        return (
            f"could not load the model in '{source}': it has no weights ({first.rstrip('.')}); pass a "
            "directory save_pretrained wrote, weights included"
        )
    if Path(source).exists() or ("/" in source and source.startswith((".", "/"))):
        return f"could not load the {what} in '{source}': {first}"
    return (
        f"could not load {what} '{source}': not a local directory and not reachable on the Hugging Face hub "
        f"({str(exc).splitlines()[0][:160]}); pass a save_pretrained directory or a spec like gpt2:n_layer=2,n_embd=64"
    )


def build_from_spec(spec: ModelSpec, tokenizer: Any, seed: int):
    """A freshly initialised causal LM whose vocabulary covers ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    special = {}
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            special[attr] = value
    special.setdefault("bos_token_id", special.get("eos_token_id"))  # byte tokenizers have no BOS
    config = spec.config(len(tokenizer), **special)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError) as exc:
        raise KdError(
            f"cannot build a causal LM from spec '{spec.model_type}': {str(exc).splitlines()[0]}"
        ) from None


def vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def same_tokenizer(a: Any, b: Any) -> bool:
    """True when both tokenizers map every token string to the same id."""
    return a.get_vocab() == b.get_vocab()


def check_shared_tokenizer(tokenizer: Any, student_tokenizer: Any | None, teacher: str, student: str) -> None:
    """Distillation compares token distributions, so both models must use one tokenizer."""
    if student_tokenizer is not None and not same_tokenizer(tokenizer, student_tokenizer):
        raise KdError(
            f"teacher '{teacher}' and student '{student}' use different tokenizers "
            f"({len(tokenizer)} vs {len(student_tokenizer)} tokens); distillation needs one shared tokenizer, "
            "so pick a student from the teacher's family or a from-scratch spec"
        )


def check_student_tokenizer(tokenizer: Any, model: Any) -> None:
    """A pretrained student (``model.student``, a directory or hub id) must use the teacher's tokenizer;
    a bare checkpoint without one is left to the vocabulary-size check."""
    try:
        student_tokenizer = load_tokenizer(model.student, trust_remote_code=model.trust_remote_code)
    except KdError:
        student_tokenizer = None
    check_shared_tokenizer(tokenizer, student_tokenizer, model.teacher, model.student)


def check_vocab_sizes(n_tokens: int, vt: int, vs: int, teacher: str, student: str) -> str | None:
    """Refuse output layers smaller than the tokenizer; describe a padded-vocabulary mismatch, if any."""
    if n_tokens > min(vt, vs):
        raise KdError(
            f"the tokenizer has {n_tokens} tokens but teacher '{teacher}' has {vt} and student "
            f"'{student}' has {vs} output rows; use models built for this tokenizer"
        )
    if vt != vs:
        return (
            f"Teacher and student vocabularies are padded to different sizes ({vt} vs {vs}); "
            f"distilling over the shared first {min(vt, vs)} tokens."
        )
    return None


def quiet_transformers() -> None:
    """kdcore shows its own progress; transformers' per-shard bars and config notes are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
