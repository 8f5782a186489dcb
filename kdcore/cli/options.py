"""Option definitions the kd commands share: help panels and texts, and the config field of each run option."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import typer

from kdcore.config import parse_assignment
from kdcore.errors import KdError

# Each run option maps to one dotted config field; the CLI only overrides what was given.
RUN_OPTIONS: dict[str, str] = {
    "teacher": "model.teacher",
    "student": "model.student",
    "tokenizer": "model.tokenizer",
    "teacher_steps": "model.teacher_steps",
    "teacher_cache": "model.teacher_cache",
    "trust_remote_code": "model.trust_remote_code",
    "dataset": "data.dataset",
    "eval_dataset": "data.eval_dataset",
    "text_column": "data.text_column",
    "seq_len": "data.seq_len",
    "train_share": "data.train_share",
    "scorer": "strategy.scorer.name",
    "pacing": "strategy.pacing.name",
    "reliance": "strategy.reliance.name",
    "divergence": "strategy.divergence.name",
    "source": "strategy.source.name",
    "temperature": "strategy.temperature",
    "reverse": "strategy.reverse",
    "max_steps": "training.max_steps",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "grad_accum": "training.grad_accum",
    "lr": "training.lr",
    "seed": "training.seed",
    "eval_every": "training.eval_every",
    "mixed_precision": "training.mixed_precision",
    "threads": "training.threads",
    "checkpoint_every": "training.checkpoint_every",
    "teacher_placement": "training.teacher_placement",
    "output_dir": "output.dir",
    "report_to": "output.report_to",
    "push_to_hub": "output.push_to_hub",
    "baseline": "output.baseline",
}

Opt = typer.Option
TRAIN_SHARE_HELP = (
    "Train the student on the first share (0 < P ≤ 1) of the training text, by characters, after the eval "
    "split; the eval set and a from-scratch teacher's data stay whole (default 1; the demo corpus: its first 40 texts)."
)
SEQ_LEN_HELP = "Tokens per packed sample."
DATASET_HELP = "Training data, as for kd run."
SPEC_TOKENIZER_HELP = "For a from-scratch teacher: 'byte' or 'bpe:vocab_size=N'."
STRAT = "Strategies"
MODEL = "Models and data"
TRAIN = "Training"


def config_file(help: str) -> Any:
    """``--config``/``-c``: a YAML or JSON file; each command says what it holds."""
    return Opt("--config", "-c", help=help)


def set_fields(help: str) -> Any:
    """``--set KEY=VALUE`` (repeatable): any config field, applied after every other option."""
    return Opt("--set", help=help)


# Options that kd train-teacher, kd cache-teacher and kd compare declare alike (kd run's sit in help panels).
SeqLen = Annotated[int | None, Opt(help=SEQ_LEN_HELP)]
Dataset = Annotated[str | None, Opt(help=DATASET_HELP)]
SpecTokenizer = Annotated[str | None, Opt(help=SPEC_TOKENIZER_HELP)]


def given_flags(options: Mapping[str, Any], names: Iterable[str]) -> dict[str, str]:
    """``{field: "--flag value"}`` for each option of ``names`` (keys of RUN_OPTIONS) that was given."""
    return {
        RUN_OPTIONS[name]: f"--{name.replace('_', '-')} {options[name]}"
        for name in names
        if options.get(name) is not None
    }


def with_sets(overrides: dict[str, Any], flags: Mapping[str, str], pairs: list[str] | None) -> dict[str, Any]:
    """``overrides`` (the flags' fields) and then every ``--set key=value``.

    A --set that contradicts a flag given for the same field is refused: neither silently wins.
    """
    for pair in pairs or []:
        key, value = parse_assignment(pair)
        if key in flags and str(overrides.get(key)) != str(value):
            raise KdError(
                f"--set {pair} contradicts {flags[key]}, which sets {key} too; pass only one of them"
            )
        overrides[key] = value
    return overrides
