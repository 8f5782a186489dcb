"""The held-out on-policy metric against greedy stepping and an explicit reverse-KL loop, prompt by prompt."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcore.training.onpolicy_eval import on_policy_kl, on_policy_kl_totals

pytestmark = pytest.mark.usefixtures("one_thread")

V, PAD = 23, 0
LENGTHS = torch.tensor([5, 2, 4, 3, 1])
PROMPTS = torch.randint(2, V, (5, 5), generator=torch.Generator().manual_seed(7))


def model(seed: int, vocab: int = V, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_layer=layers, n_embd=16, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1,
        pad_token_id=PAD, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    return GPT2LMHeadModel(config).double().eval()  # float64: greedy picks match the reference exactly


@torch.no_grad()
def reference(student, teacher, n: int, eos: int | None) -> tuple[float, int]:
    """Greedy stepping without the cache, one prompt at a time, and KL(P_S ‖ P_T) by explicit sums."""
    total, count = 0.0, 0
    for prompt, length in zip(PROMPTS, LENGTHS.tolist(), strict=True):
        ids = prompt[:length].tolist()
        for _ in range(n):
            s = student(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
            t = teacher(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
            shared = min(len(s), len(t))
            s_norm = math.log(sum(math.exp(x) for x in s[:shared]))
            t_norm = math.log(sum(math.exp(x) for x in t[:shared]))
            total += sum(math.exp(s[v] - s_norm) * ((s[v] - s_norm) - (t[v] - t_norm)) for v in range(shared))
            count += 1
            token = max(range(len(s)), key=lambda v: s[v])  # the student's greedy pick, full vocabulary
            ids.append(token)
            if token == eos:
                break
    return total, count


@pytest.mark.parametrize("teacher_vocab", [V, V + 3])
def test_mean_reverse_kl_on_greedy_continuations(teacher_vocab):
    student, teacher = model(0), model(1, teacher_vocab, layers=2)
    total, count = on_policy_kl_totals(
        student, teacher, PROMPTS, LENGTHS, max_new_tokens=6, pad_id=PAD, eos_ids=(), batch_size=2
    )
    ref_total, ref_count = reference(student, teacher, 6, None)
    assert count.item() == ref_count == 6 * len(LENGTHS)
    # float64 throughout; only the summation order differs
    assert total.item() == pytest.approx(ref_total, rel=1e-10)


def test_eos_ends_a_continuation_and_the_mean_is_token_weighted():
    student, teacher = model(0), model(1, layers=2)
    free = on_policy_kl_totals(student, teacher, PROMPTS[:1], LENGTHS[:1], max_new_tokens=6, pad_id=PAD)
    assert free[1].item() == 6
    # the student's third greedy token on prompt 0 becomes the EOS: prompt 0 then stops after 3 tokens
    ids = PROMPTS[0, : LENGTHS[0]].tolist()
    for _ in range(3):
        ids.append(int(student(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    eos = ids[-1]
    total, count = on_policy_kl_totals(
        student, teacher, PROMPTS, LENGTHS, max_new_tokens=6, pad_id=PAD, eos_ids=(eos,), batch_size=5
    )
    ref_total, ref_count = reference(student, teacher, 6, eos)
    assert count.item() == ref_count < 6 * len(LENGTHS)
    assert total.item() == pytest.approx(ref_total, rel=1e-10)
    mean = on_policy_kl(student, teacher, PROMPTS, LENGTHS, max_new_tokens=6, pad_id=PAD, eos_ids=(eos,))
    assert mean == pytest.approx(ref_total / ref_count, rel=1e-10) and mean > 0


def test_zero_against_itself_and_modes_restored():
    student = model(0).train()
    teacher = model(0).train()  # the same weights
    assert on_policy_kl(student, teacher, PROMPTS, LENGTHS, max_new_tokens=4, pad_id=PAD) == pytest.approx(
        0.0, abs=1e-12
    )
    assert student.training and teacher.training
