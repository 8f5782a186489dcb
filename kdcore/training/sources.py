"""The request a :class:`~kdcore.strategies.Source` answers: a micro-batch's dataset rows, and continuations
written for it with :mod:`kdcore.training.generation`.

Rows are left-justified like packed samples, so the training forward needs no ``position_ids`` and a
generated token sits at the position it had while it was written; the teacher scores the exact ids the
model wrote, with the same attention mask. A batch that mixes dataset and generated rows is padded to its
widest row (pad id, mask 0, label ``IGNORE_INDEX``): padding counts nowhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdcore.errors import KdError
from kdcore.inputs.packing import IGNORE_INDEX, PackedDataset, shift_labels
from kdcore.strategies import ReliancePolicy, Source, SourceContext, SourceRequest, SourceRows
from kdcore.training import parallel
from kdcore.training.curriculum import derive_seed
from kdcore.training.generation import generate, row_seeds

__all__ = [
    "BatchRequest",
    "GenerationClock",
    "check_source",
    "dataset_rows",
    "eos_ids_of",
    "max_positions",
    "source_context",
]


def dataset_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> SourceRows:
    """Packed samples as rows: gold next-token labels (from the dataset's own unshifted ``labels`` when
    it has them, e.g. a chat sample's assistant tokens), nothing generated, everything labelled."""
    n = len(input_ids)
    return SourceRows(
        input_ids,
        attention_mask,
        shift_labels(input_ids, attention_mask, labels),
        generated=torch.zeros(n, dtype=torch.bool),
        labelled=torch.ones(n, dtype=torch.bool),
    )


def _widen(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    extra = width - tensor.shape[1]
    return tensor if extra == 0 else torch.cat([tensor, tensor.new_full((len(tensor), extra), fill)], dim=1)


def _place(base: SourceRows, rows: SourceRows, where: torch.Tensor, pad_id: int) -> SourceRows:
    """``base`` with ``rows`` in place of its rows ``where`` (indices), both widened to the wider one."""
    width = max(base.input_ids.shape[1], rows.input_ids.shape[1])
    prompt_base = (
        torch.full_like(base.labels, IGNORE_INDEX) if base.prompt_labels is None else base.prompt_labels
    )
    out = []
    for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        merged = _widen(getattr(base, name), width, fill).clone()
        merged[where] = _widen(getattr(rows, name), width, fill)
        out.append(merged)
    prompt_labels = _widen(prompt_base, width, IGNORE_INDEX).clone()
    prompt_labels[where] = _widen(rows.prompt_labels, width, IGNORE_INDEX)
    generated, labelled = base.generated.clone(), base.labelled.clone()
    generated[where], labelled[where] = rows.generated, rows.labelled
    return SourceRows(*out, generated=generated, labelled=labelled, prompt_labels=prompt_labels)


@dataclass
class GenerationClock:
    """Seconds spent in :meth:`BatchRequest.generate`, for the run's share of time generating. The engine
    owns it and every copy of a request (``with_rows``, ``dataclasses.replace``) adds to the same one."""

    seconds: float = 0.0


@dataclass
class BatchRequest(SourceRequest):
    """The engine's :class:`~kdcore.strategies.SourceRequest`: continuations from
    :func:`~kdcore.training.generation.generate`, seeded per ``(seed, step, sample id)``."""

    pad_id: int = 0
    eos_ids: tuple[int, ...] = ()
    clock: GenerationClock = field(default_factory=GenerationClock)

    def generate(
        self,
        model: torch.nn.Module,
        prompt_lengths: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        labelled: bool = False,
    ) -> SourceRows:
        lengths = prompt_lengths.to("cpu", torch.long).minimum(self.dataset.attention_mask.sum(1))
        where = (lengths >= 2).nonzero().squeeze(1)  # a prompt needs a gold token for the scorer
        if len(where) == 0:
            return self.dataset
        start = time.perf_counter()
        gen = generate(
            model,
            self.dataset.input_ids[where, : int(lengths[where].max())],
            lengths[where],
            max_new_tokens=max_new_tokens,
            pad_id=self.pad_id,
            seeds=row_seeds(self.seed, self.step, self.sample_ids[where].tolist()),
            eos_ids=self.eos_ids,
            temperature=temperature,
            top_p=top_p,
        )
        self.clock.seconds += time.perf_counter() - start
        n = len(where)
        rows = SourceRows(
            gen.input_ids,
            gen.attention_mask,
            gen.labels(),
            generated=torch.ones(n, dtype=torch.bool),
            labelled=torch.full((n,), labelled, dtype=torch.bool),
            prompt_labels=gen.prompt_labels(),
        )
        return rows if n == len(lengths) else _place(self.dataset, rows, where, self.pad_id)

    def coin(self, stream: str) -> torch.Tensor:
        draws = [
            torch.rand(
                (), generator=torch.Generator().manual_seed(derive_seed(stream, self.seed, self.step, i))
            )
            for i in self.sample_ids.tolist()
        ]
        return torch.stack(draws) if draws else torch.zeros(0)


def max_positions(*models: Any) -> int | None:
    """The fewest positions any of ``models`` (models or their configs; None is skipped) attends to;
    None when none says."""
    limits = []
    for model in models:
        config = getattr(model, "config", model)
        for attr in ("n_positions", "max_position_embeddings"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                limits.append(value)
                break
    return min(limits) if limits else None


def source_context(train: PackedDataset, *models: Any) -> SourceContext:
    """What :meth:`~kdcore.strategies.Source.check` is given: the packed data's lengths and the limit of
    ``models`` (models or configs, so that a dry run checks as the run does without loading weights)."""
    longest = None if train.prompt_lengths is None else int(train.prompt_lengths.max())
    return SourceContext(train.seq_len, max_positions(*models), longest)


def eos_ids_of(tokenizer_eos: int | None, model: torch.nn.Module) -> tuple[int, ...]:
    """The ids that end a continuation: the tokenizer's EOS and the model's generation config's (an
    instruct model lists its end-of-turn token there)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (tokenizer_eos, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def check_source(
    source: Source, source_name: str, reliance: ReliancePolicy, reliance_name: str, cache: bool
) -> None:
    """Refuse, before anything loads, a source that cannot run with the rest of the config: a teacher
    cache (it holds the teacher on the dataset's text only), or a reliance policy that gives λ = 0 to
    every sample when every row is the student's own text (the loss would be 0 everywhere), or FSDP and
    DeepSpeed with a source that writes text (generation stops when a process's rows have all ended, so
    processes could make different numbers of forward calls, and a sharded model would wait forever)."""
    sharded = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}.get(parallel.requested())
    if sharded and source.generates():
        raise KdError(
            f"source '{source_name}' writes text during training, which kdcore does not run under {sharded} "
            "(processes may make different numbers of forward calls while generating); use --source "
            "dataset, or launch with DDP (torchrun, docs/scaling.md)"
        )
    if cache and source.generates():
        raise KdError(
            f"a teacher cache holds the teacher's outputs on the dataset's text only, and source "
            f"'{source_name}' trains on text written during training; drop --teacher-cache or use --source dataset"
        )
    if source.has_labels():
        return
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, float("nan")])
    if all(bool((reliance.weights(grid, grid, p) == 0).all()) for p in (0.0, 0.25, 0.5, 0.75, 1.0)):
        fix = (
            "raise --lambda above 0, or choose another reliance policy"
            if reliance_name == "fixed"
            else "choose another reliance policy (e.g. fixed)"
        )
        raise KdError(
            f"source '{source_name}' trains on the teacher term alone and reliance '{reliance_name}' sets "
            f"every λ to 0, so nothing would be learnt; {fix}"
        )
