"""No-grad passes over a packed dataset: perplexity and per-sample statistics.

Perplexity is computed from the final hidden states through the LM head chunk by chunk when the
model allows it (:func:`~kdcore.training.fused_loss.fusable`), so evaluating a large-vocabulary
model never holds a ``[batch, tokens, vocab]`` logits tensor; the numbers are those of the logits.
"""

from __future__ import annotations

import math

import torch

from kdcore.inputs.packing import IGNORE_INDEX, PackedDataset
from kdcore.training.fused_loss import final_hidden_states, fusable, fused_sample_terms, linear_head
from kdcore.training.losses import per_sample_terms, token_nll_sum


def _batches(data: PackedDataset, batch_size: int, device: torch.device):
    for start in range(0, len(data), batch_size):
        yield data.batch(slice(start, start + batch_size), device)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: PackedDataset, batch_size: int = 32) -> float:
    """exp(mean token NLL) over every valid token of ``data`` (for chat data: the assistant tokens)."""
    total, count = nll_totals(model, data, batch_size)
    return math.exp(total.item() / max(count.item(), 1.0))


@torch.no_grad()
def nll_totals(
    model: torch.nn.Module, data: PackedDataset, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token NLL and valid-token count over ``data`` (float64, CPU): shards add up."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    head = linear_head(model) if fusable(model) else None
    for ids, mask, labels in _batches(data, batch_size, device):
        if head is not None:
            terms = fused_sample_terms(
                final_hidden_states(model, ids, mask), head[0], labels, student_bias=head[1]
            )
            nll, n = (terms.ce.double() * terms.tokens.double()).sum(), terms.tokens.sum()
        else:
            nll, n = token_nll_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        total += nll.double().cpu()
        count += n.double().cpu()
    model.train(was_training)
    return total, count


@torch.no_grad()
def sample_stats(
    model: torch.nn.Module, data: PackedDataset, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Per-sample ``ce``, ``confidence`` (mean gold-token probability) and ``entropy``, shape ``[N]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"ce": [], "confidence": [], "entropy": []}
    for ids, mask, labels in _batches(data, batch_size, device):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        terms = per_sample_terms(logits, labels)
        valid = (labels != IGNORE_INDEX).float()
        logp = torch.log_softmax(logits, dim=-1)
        token_entropy = -(logp.exp() * logp).sum(-1)
        entropy = (token_entropy * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        out["ce"].append(terms.ce.cpu())
        out["confidence"].append(terms.confidence.cpu())
        out["entropy"].append(entropy.cpu())
    model.train(was_training)
    return {key: torch.cat(parts) for key, parts in out.items()}
