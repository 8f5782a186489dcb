"""kd train-teacher: a causal LM trained with plain CE, saved for --teacher DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from kdcore.cli.common import err, friendly_errors, offline_hint
from kdcore.cli.options import DATASET_HELP, SEQ_LEN_HELP, Opt
from kdcore.config import resolve_config
from kdcore.errors import KdError


@friendly_errors
def train_teacher(
    model: Annotated[
        str,
        Opt(help="Spec like gpt2:n_layer=4,n_embd=128,n_head=4, a local directory, a hub id or a GGUF file."),
    ],
    output_dir: Annotated[Path, Opt(help="Where to save_pretrained the model and tokenizer.")],
    dataset: Annotated[str, Opt(help=DATASET_HELP)] = "demo",
    eval_dataset: Annotated[str | None, Opt(help="Evaluation data.")] = None,
    text_column: Annotated[str, Opt(help="Text column of tabular data.")] = "text",
    tokenizer: Annotated[
        str | None, Opt(help="'byte' or 'bpe:vocab_size=N' for a from-scratch model.")
    ] = None,
    seq_len: Annotated[int, Opt(help=SEQ_LEN_HELP)] = 128,
    max_steps: Annotated[int, Opt(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, Opt(help="Samples per step.")] = 16,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = 3e-3,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
) -> None:
    """Train a causal LM with plain cross-entropy and save it, ready for --teacher DIR."""
    from kdcore.files import check_output_dir

    check_output_dir(output_dir, "--output-dir")
    if (output_dir / "config.json").exists():
        raise KdError(f"'{output_dir}' already holds a model; choose another --output-dir")
    cfg = resolve_config(
        None,
        {
            "data.dataset": dataset,
            "data.eval_dataset": eval_dataset,
            "data.text_column": text_column,
            "data.seq_len": seq_len,
            "training.max_steps": max_steps,
            "training.batch_size": batch_size,
            "training.lr": lr,
            "training.seed": seed,
        },
    )
    offline_hint()
    from kdcore.teachers.train import train_teacher

    train_teacher(model, tokenizer, cfg, output_dir, err)
