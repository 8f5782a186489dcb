"""kd cache-teacher: the teacher's top-K log-probabilities on disk, for kd run --teacher-cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from kdcore.cli.common import err, friendly_errors, offline_hint
from kdcore.cli.options import (
    RUN_OPTIONS,
    Dataset,
    Opt,
    SeqLen,
    SpecTokenizer,
    config_file,
    given_flags,
    set_fields,
    with_sets,
)
from kdcore.config import resolve_config


@friendly_errors
def cache_teacher(
    output: Annotated[Path, Opt(help="Directory to write the cache to (must not exist or be empty).")],
    config: Annotated[Path | None, config_file("The run's YAML or JSON config; flags override it.")] = None,
    teacher: Annotated[
        str | None, Opt(help="Hub id, local directory, GGUF file, or from-scratch spec.")
    ] = None,
    dataset: Dataset = None,
    tokenizer: SpecTokenizer = None,
    seq_len: SeqLen = None,
    top_k: Annotated[int, Opt(help="Tokens kept per position (the vocabulary size keeps them all).")] = 64,
    dtype: Annotated[str, Opt(help="Log-probability storage: float32 or float16.")] = "float32",
    batch_size: Annotated[int, Opt(help="Samples per teacher forward pass.")] = 32,
    set_: Annotated[
        list[str] | None, set_fields("Any config field, e.g. --set data.demo_samples=500.")
    ] = None,
) -> None:
    """Run the teacher once over the training set and store its top-K log-probabilities for kd run --teacher-cache."""
    given = {"teacher": teacher, "dataset": dataset, "tokenizer": tokenizer, "seq_len": seq_len}
    overrides = {RUN_OPTIONS[name]: value for name, value in given.items() if value is not None}
    cfg = resolve_config(config, with_sets(overrides, given_flags(given, given), set_))
    offline_hint()
    from kdcore.teachers.cache import build_cache

    build_cache(cfg, output, top_k=top_k, dtype=dtype, batch_size=batch_size, console=err)
