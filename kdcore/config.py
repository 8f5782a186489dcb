"""The run configuration: pydantic models, YAML/JSON loading, and CLI overrides.

One :class:`RunConfig` describes a run completely; it is written to ``config.yaml`` in the run
directory and can be fed back with ``kd run --config``. A wrong type or value is reported as one
line per field (``training.batch_size: Input should be greater than 0``), never a traceback.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdcore.errors import KdError
from kdcore.strategies import KINDS

DEFAULT_TEACHER = "gpt2:n_layer=4,n_embd=128,n_head=4"
DEFAULT_STUDENT = "gpt2:n_layer=2,n_embd=48,n_head=2"
DEFAULT_STEPS = 400
#: how many generated demo texts the student trains on when ``data.train_share`` is not given (a share of
#: 0.02 of the default 2000: about 160 epochs in 400 steps), while a from-scratch teacher trains on all of them
DEMO_STUDENT_TEXTS = 40
#: numpy's generators (seeded by accelerate's set_seed) take seeds in [0, 2**32 - 1]
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False
    )


class StrategySpec(_Section):
    """A strategy chosen by name, with its parameters (validated by the strategy's own model)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class ModelConfig(_Section):
    teacher: str = Field(
        DEFAULT_TEACHER, description="hub id, local directory, GGUF file, or spec 'gpt2:n_layer=2,...'"
    )
    student: str = Field(
        DEFAULT_STUDENT,
        description="hub id, local directory, GGUF file, from-scratch spec, or 'from-teacher:num_layers=4'",
    )
    tokenizer: str | None = Field(
        None, description="for from-scratch teachers: 'byte' or 'bpe:vocab_size=N' (default byte)"
    )
    trust_remote_code: bool = False
    teacher_steps: int = Field(
        500, gt=0, description="training steps when the teacher is a from-scratch spec"
    )
    teacher_cache: Path | None = Field(
        None, description="directory written by 'kd cache-teacher': train from it, without the teacher model"
    )


class DataConfig(_Section):
    dataset: str = Field("demo", description="'demo', a local file or folder, or hub 'name:config:split'")
    eval_dataset: str | None = None
    format: Literal["auto", "text", "chat"] = Field(
        "auto",
        description="chat: one sample per row of a .jsonl of 'messages' or 'prompt'/'completion', trained on "
        "the assistant/completion tokens only; text: packed text; auto: chat when the first row is one",
    )
    text_column: str = "text"
    seq_len: int = Field(128, gt=1)
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held out when no eval set is given")
    train_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the student trains on the first share of the training text, by characters, after the "
        f"eval split (a from-scratch teacher on all of it); default 1, and for the demo corpus the share of its first "
        f"{DEMO_STUDENT_TEXTS} texts",
    )
    demo_samples: int = Field(2000, gt=10, description="size of the generated demo corpus")
    max_eval_samples: int | None = Field(256, gt=0)

    @property
    def student_share(self) -> float:
        """``train_share`` as given, else the dataset's default: all of a user's text, and a small share of
        the demo corpus, whose teacher trains on all of it — the data-limited regime where distillation pays
        (docs/results.md, "The demo corpus")."""
        if self.train_share is not None:
            return self.train_share
        return min(1.0, DEMO_STUDENT_TEXTS / self.demo_samples) if self.dataset == "demo" else 1.0


class StrategyConfig(_Section):
    scorer: StrategySpec = StrategySpec(name="none")
    pacing: StrategySpec = StrategySpec(name="none")
    reliance: StrategySpec = StrategySpec(name="fixed")
    divergence: StrategySpec = StrategySpec(name="forward-kl")
    source: StrategySpec = StrategySpec(name="dataset")
    temperature: float = Field(1.0, gt=0)
    refresh_every: int | None = Field(
        None,
        gt=0,
        description="steps between curriculum re-sorts (default: each epoch or each tenth of training, whichever is sooner)",
    )
    reverse: bool = Field(
        False, description="order the curriculum hard-to-easy (the anti-curriculum control)"
    )

    def names(self) -> dict[str, str]:
        return {kind: getattr(self, kind).name for kind in KINDS}

    def label(self) -> str:
        n = self.names()
        parts = [n["reliance"]]
        if n["scorer"] != "none" or n["pacing"] != "none":
            parts = [n["scorer"], n["pacing"], *parts]
        if n["source"] != "dataset":
            parts = [n["source"], *parts]
        return "-".join(parts)


class OnPolicyEvalConfig(_Section):
    """The held-out on-policy metric: the teacher's reverse KL on the student's greedy continuations."""

    prompts: int = Field(64, ge=0, description="held-out samples whose prompts are continued (0: off)")
    prompt_tokens: int = Field(32, ge=2, description="prompt length of a text sample (chat: its own prompt)")
    max_new_tokens: int = Field(32, ge=1, description="the longest continuation")


class TrainingConfig(_Section):
    max_steps: int | None = Field(None, gt=0, description="total optimizer steps (wins over epochs)")
    epochs: float | None = Field(
        None, gt=0, description="epochs over the training set when max_steps is unset"
    )
    batch_size: int = Field(16, gt=0, description="samples per optimizer step")
    grad_accum: int = Field(1, gt=0, description="micro-batches per step; batch_size must divide by it")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (default: 4 per run)")
    log_every: int = Field(10, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    checkpoint_every: int | None = Field(
        100, gt=0, description="steps between checkpoints in RUN_DIR/checkpoints (null: none)"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss: stop with an error, or skip that batch's update"
    )
    onpolicy_eval: OnPolicyEvalConfig = OnPolicyEvalConfig()
    loss_path: Literal["auto", "fused", "logits"] = Field(
        "auto",
        description="fused: logits computed chunk by chunk from final hidden states inside the loss "
        "(auto: whenever the student's head, and a live teacher's, is linear; with a teacher cache the "
        "student's against its top-K); logits: full logits",
    )
    teacher_prefetch: bool = Field(
        False,
        description="run the live teacher on the next micro-batch in a background thread during the "
        "student's step (same results; the run's threads are split between the two; off with a teacher "
        "cache, a source that writes text, or sharded models)",
    )
    teacher_placement: Literal["replicated", "sharded"] = Field(
        "replicated",
        description="the teacher whole on every process, or split over them with FSDP2 (needs an FSDP launch)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_steps") is None and data.get("epochs") is None:
            data = {**data, "max_steps": DEFAULT_STEPS}
        return data


class OutputConfig(_Section):
    dir: Path | None = Field(None, description="default runs/<timestamp>-<strategy>")
    save_student: bool = True
    keep_checkpoints: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "all"] = Field(
        "none", description="experiment tracker(s), through accelerate; 'all' = every one installed"
    )
    tracker_project: str = Field("kdcore", description="project (wandb) / experiment (mlflow) name")
    push_to_hub: str | None = Field(
        None, description="hub repo id ('user/name') to upload the student and its model card to"
    )
    baseline: bool = Field(
        False,
        description="also train the CE-only student (same data, steps and seed, no teacher) in RUN_DIR/baseline "
        "and report the share of the CE→teacher gap closed",
    )


class RunConfig(_Section):
    """Everything a run needs; serialises to the run's ``config.yaml``."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    strategy: StrategyConfig = StrategyConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("model", "data", "strategy", "training", "output", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-5`` is a number, as every user means it.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-5``) and ``1e-5`` is a string.
    """


_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")  # 1e-5, 2E3; the dotted forms are 1.1's
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """YAML read safely (nothing constructed but plain values), with ``1e-5`` a float; raises
    ``yaml.YAMLError``, or ``RecursionError`` for nesting deeper than Python's stack."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain values only


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: reason``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        where = ".".join(p for p in (prefix, loc) if p)
        lines.append(f"{where or 'config'}: {err['msg']}")
    return "invalid config: " + "; ".join(lines)


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted = 'a.b'``, creating sections on the way."""
    *parents, leaf = dotted.split(".")
    if not all(part.strip() for part in (*parents, leaf)):
        raise KdError(f"'{dotted}' is not a config field: a name between dots is empty; e.g. training.seed")
    node = tree
    for part in parents:
        if isinstance(node.get(part), str):  # 'scorer: root' is shorthand for {name: root}
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KdError(f"cannot set '{dotted}': '{part}' is not a section")
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` with a YAML value, so ``0.5`` is a float and ``[1, 2]`` a list."""
    if "=" not in text:
        raise KdError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise KdError(f"expected key=value, got '{text}' with nothing before '='; e.g. training.seed=1")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip(), value


def load_file(path: Path) -> dict[str, Any]:
    if path.is_dir():
        inside = [path / name for name in ("config.yaml", "compare.yaml") if (path / name).is_file()]
        example = f" such as '{inside[0]}'" if inside else ""
        raise KdError(f"config file '{path}' is a directory; pass a YAML or JSON file{example}")
    if not path.is_file():
        raise KdError(f"config file '{path}' does not exist; pass an existing YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KdError(
            f"config file '{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); pass a YAML or JSON file"
        ) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise KdError(f"config file '{path}' is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise KdError(
            f"config file '{path}' is nested too deeply to read; a run config is a few levels of sections "
            "(model, data, strategy, ...)"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdError(f"config file '{path}' must hold a mapping of sections (model, data, strategy, ...)")
    return data


def resolve_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """File (if any), then dotted overrides (``{'training.seed': 3}``), validated as a whole."""
    return resolve_tree(load_file(path) if path else {}, overrides)


def resolve_tree(tree: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A config tree already read (a copy is taken), then dotted overrides, validated as a whole."""
    tree = copy.deepcopy(dict(tree))
    # Strategy defaults first, so that '--reliance-arg k=v' alone keeps the default policy's name.
    tree["strategy"] = deep_merge(StrategyConfig().model_dump(mode="json"), tree.get("strategy") or {})
    for dotted, value in (overrides or {}).items():
        set_path(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise KdError(format_validation_error(exc)) from None
