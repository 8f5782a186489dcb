"""Batched sampling of continuations from a causal LM, with the KV cache, seeded per sample.

On-policy distillation trains on what the student itself writes: a prompt from each training sample, a
continuation sampled from the student, the teacher's distribution on those tokens. This module writes the
continuations; it is a small loop over the model's KV cache rather than ``transformers``' ``generate``
because ``generate`` samples with ``torch.multinomial`` on the *global* RNG (it accepts no generator), so
it would shift the dropout masks of the training step and tie the samples to the batch's layout.

Rules:

- **Prompts of different lengths are left-padded inside the loop** and given explicit ``position_ids``
  (``cumsum(mask) − 1``), so that every row writes its next token in the same column and the cache grows
  by one column per step. Per-row write positions in a right-padded batch would need a scattered cache
  update. The result is handed back **left-justified** (prompt at column 0, padding at the end), exactly
  like a dataset row, so a later forward pass needs no ``position_ids``: every token sits at the position
  it had while it was generated.
- **Randomness** comes from one generator per row, seeded from ``(seed, step, sample id)``
  (:func:`row_seeds`): a row's draws do not depend on which other rows share its batch, on the process
  it runs on or on gradient accumulation, and the global RNG is never touched. Each row draws its
  ``max_new_tokens`` uniforms up front and samples by inverse CDF.
- **EOS**: a row stops at its first EOS (any of ``eos_ids``); the EOS itself counts, what the loop emits
  for the row afterwards is padding that counts nowhere (mask 0). The loop ends when every row stopped.
- ``temperature = 0`` is greedy (argmax); ``top_p < 1`` keeps the smallest set of most likely tokens whose
  mass reaches ``top_p`` (the most likely token always), as ``transformers``' ``TopPLogitsWarper``.
- The model runs without gradient and in eval mode (no dropout), and is put back in its previous mode.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from kdcore.inputs.packing import IGNORE_INDEX
from kdcore.training.curriculum import derive_seed

__all__ = ["Generated", "eval_mode", "generate", "prompts_of", "row_seeds", "sample_next"]


def row_seeds(seed: int, step: int, sample_ids: Iterable[int], stream: str = "generate") -> list[int]:
    """One seed per sample for the continuation drawn at ``step``: independent of batch layout and process."""
    return [derive_seed(stream, int(seed), int(step), int(i)) for i in sample_ids]


@dataclass
class Generated:
    """Prompts and their continuations, left-justified like dataset rows, ``[B, W]`` each.

    ``attention_mask`` is 1 on the prompt and on the generated tokens that count; ``generated_mask`` is
    True on the generated tokens that count (up to and including the first EOS).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    generated_mask: torch.Tensor
    prompt_lengths: torch.Tensor  # [B]

    def labels(self) -> torch.Tensor:
        """Next-token targets on the generated tokens only (``IGNORE_INDEX`` elsewhere), aligned with the logits."""
        labels = torch.full_like(self.input_ids, IGNORE_INDEX)
        labels[:, :-1] = self.input_ids[:, 1:].masked_fill(~self.generated_mask[:, 1:], IGNORE_INDEX)
        return labels

    def prompt_labels(self) -> torch.Tensor:
        """Next-token targets inside the prompt only (its gold text), aligned with the logits."""
        labels = torch.full_like(self.input_ids, IGNORE_INDEX)
        inside = torch.arange(1, self.input_ids.shape[1]).unsqueeze(0) < self.prompt_lengths.unsqueeze(1)
        labels[:, :-1] = self.input_ids[:, 1:].masked_fill(~inside, IGNORE_INDEX)
        return labels

    def generated_tokens(self) -> torch.Tensor:
        """Counted generated tokens per row, ``[B]`` long."""
        return self.generated_mask.sum(1)


def prompts_of(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of dataset rows: their first ``prompt_tokens`` valid tokens (all of a shorter row).

    Returns ``(prompt_ids [B, P], prompt_lengths [B])``, left-justified like the rows. A row needs at least
    2 valid tokens to be a prompt (one gold token for the scorer's statistics); callers keep the others
    as dataset rows (``prompt_lengths < 2``).
    """
    lengths = attention_mask.sum(1).clamp(max=prompt_tokens).to("cpu", torch.long)
    return input_ids[:, : max(1, int(lengths.max()))].to("cpu", torch.long), lengths


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tokens outside the nucleus: those whose more likely tokens already reach ``top_p``."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def sample_next(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """The next token of each row from ``logits`` ``[B, V]`` and one uniform in [0, 1) per row (inverse CDF)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    cdf = probs.double().cumsum(-1)
    # right=True: the first token whose CDF exceeds u; a token of probability 0 is never chosen.
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp(max=logits.shape[-1] - 1)


def _uniforms(seeds: Sequence[int], n: int, device: torch.device) -> torch.Tensor:
    """``[B, n]`` uniforms, row ``i`` from its own CPU generator seeded with ``seeds[i]``."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device)


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """The models in eval mode (no dropout) inside, each back in its own previous mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _cache_key(model: torch.nn.Module) -> str:
    """``transformers`` 5 calls the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    seeds: Sequence[int],
    eos_ids: Iterable[int] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> Generated:
    """Sample a continuation of each prompt; see the module docstring for the rules.

    ``prompt_ids`` ``[B, P]`` holds the prompts left-justified (row ``i``'s first ``prompt_lengths[i]``
    tokens, at least 1; the rest is ignored), as dataset rows are. ``seeds``: one per row (:func:`row_seeds`).
    ``use_cache=False`` recomputes the whole sequence at each step (for measurements and tests only).
    """
    batch, width = prompt_ids.shape
    lengths = prompt_lengths.to("cpu", torch.long)
    if len(seeds) != batch or lengths.shape != (batch,):
        raise ValueError(
            f"expected {batch} seeds and prompt lengths, got {len(seeds)} and {tuple(lengths.shape)}"
        )
    if batch == 0 or not (int(lengths.min()) >= 1 and int(lengths.max()) <= width):
        raise ValueError(f"prompt lengths must lie in [1, {width}], got {lengths.tolist()}")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got {max_new_tokens}, "
            f"{temperature} and {top_p}"
        )
    device = next(model.parameters()).device
    longest = int(lengths.max())
    cols = torch.arange(longest)
    # Left-pad: row i's prompt ends in the last column.
    shift = longest - lengths
    src = (cols.unsqueeze(0) - shift.unsqueeze(1)).clamp(min=0)
    left_mask = cols.unsqueeze(0) >= shift.unsqueeze(1)
    ids = prompt_ids.to("cpu")[:, :longest].gather(1, src).masked_fill(~left_mask, pad_id).to(device)
    mask = left_mask.long().to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_position = lengths.to(device).unsqueeze(1)
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=device)
    uniforms = _uniforms(seeds, max_new_tokens, device)
    cache_key = _cache_key(model)
    wants_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    with eval_mode(model):
        extra = {"logits_to_keep": 1} if wants_last else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, **extra)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, counted = [], []
        for t in range(max_new_tokens):
            token = sample_next(out.logits[:, -1], uniforms[:, t], temperature, top_p).masked_fill(
                finished, pad_id
            )
            tokens.append(token)
            counted.append(~finished)
            finished = finished | torch.isin(token, eos)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:
                step_in = {
                    "input_ids": token.unsqueeze(1),
                    "position_ids": next_position,
                    cache_key: _cache_of(out),
                }
            else:
                ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
                positions = torch.cat([positions, next_position], dim=1)
                step_in = {"input_ids": ids, "position_ids": positions}
            out = model(**step_in, attention_mask=mask, use_cache=use_cache, **extra)
            next_position = next_position + 1
    return _left_justify(
        prompt_ids, lengths, torch.stack(tokens, 1).cpu(), torch.stack(counted, 1).cpu(), pad_id
    )


def _left_justify(
    prompt_ids: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor, pad_id: int
) -> Generated:
    """Prompt at column 0, its counted continuation right after it, padding to the widest row."""
    batch, steps = tokens.shape
    total = lengths + counted.sum(1)
    width = int(total.max())
    cols = torch.arange(width).unsqueeze(0)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    keep = min(width, prompt_ids.shape[1])
    in_prompt = cols[:, :keep] < lengths.unsqueeze(1)
    input_ids[:, :keep] = prompt_ids.to("cpu", torch.long)[:, :keep].masked_fill(~in_prompt, pad_id)
    rows = torch.arange(batch).unsqueeze(1).expand(batch, steps)
    where = lengths.unsqueeze(1) + torch.arange(steps).unsqueeze(0)
    input_ids[rows[counted], where[counted]] = tokens[counted]
    generated = (cols >= lengths.unsqueeze(1)) & (cols < total.unsqueeze(1))
    attention = (cols < total.unsqueeze(1)).long()
    return Generated(input_ids, attention, generated, lengths.clone())
