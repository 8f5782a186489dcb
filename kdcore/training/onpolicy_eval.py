"""The held-out on-policy metric: how far the teacher finds the student's own greedy continuations.

For each held-out prompt the student writes its greedy continuation (temperature 0, at most
``max_new_tokens`` tokens, stopping after its first EOS, which counts). At every counted generated token
``y_t`` both models see the same prefix (prompt and the earlier generated tokens) and the metric adds
``KL(P_S ‖ P_T) = Σ_v P_S(v) · (log P_S(v) − log P_T(v))`` over the next-token distributions at temperature 1
(over the shared first ``min(V_S, V_T)`` tokens when the vocabularies differ in size, as the KD term does).
The result is the mean over all counted tokens of all prompts (token-weighted, like perplexity), in nats.
Zero means the teacher would have written the student's continuations exactly as likely as the student;
it measures the mode-seeking gap that on-policy training minimises, on text the student produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.training.generation import eval_mode, generate

__all__ = ["on_policy_kl", "on_policy_kl_totals"]


@torch.no_grad()
def on_policy_kl_totals(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_ids: tuple[int, ...] = (),
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reverse KL over the counted generated tokens and their count (float64, CPU): shards add up.

    ``prompt_ids`` ``[N, P]`` and ``prompt_lengths`` ``[N]`` as for :func:`~kdcore.training.generation.generate`.
    """
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    device = next(student.parameters()).device
    with eval_mode(student, teacher):
        for start in range(0, len(prompt_ids), batch_size):
            rows = slice(start, start + batch_size)
            out = generate(
                student,
                prompt_ids[rows],
                prompt_lengths[rows],
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                seeds=[0] * len(prompt_ids[rows]),  # greedy: the uniforms are not used
                eos_ids=eos_ids,
                temperature=0.0,
            )
            ids, mask = out.input_ids.to(device), out.attention_mask.to(device)
            # position t predicts token t + 1: keep the positions whose next token was generated
            predicts = out.generated_mask[:, 1:].to(device)
            s = student(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts]
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][predicts]
            shared = min(s.shape[-1], t.shape[-1])
            s_logp = F.log_softmax(s[:, :shared].double(), dim=-1)
            t_logp = F.log_softmax(t[:, :shared].double(), dim=-1)
            total += (s_logp.exp() * (s_logp - t_logp)).sum().cpu()
            count += predicts.sum().double().cpu()
    return total, count


def on_policy_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    **kwargs: object,
) -> float:
    """The teacher's mean per-token reverse KL to the student's greedy continuations (module docstring)."""
    total, count = on_policy_kl_totals(student, teacher, prompt_ids, prompt_lengths, **kwargs)
    return float(total / count.clamp(min=1.0))
