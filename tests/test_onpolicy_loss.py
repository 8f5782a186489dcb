"""The loss of a batch mixing dataset and generated rows, against explicit loops on a hand-built batch."""

from __future__ import annotations

import math

import pytest
import torch

from kdcore.plugins import get_registry
from kdcore.training.generation import Generated
from kdcore.training.losses import per_sample_terms
from kdcore.training.onpolicy_loss import sample_losses, source_terms

pytestmark = pytest.mark.usefixtures("one_thread")

X = -100
TAU = 2.0
V = 5
EOS, PAD = 1, 0
# Row 0: dataset text, 7 tokens. Row 1: prompt of 3, then 3 generated tokens ending in EOS, then padding.
# Row 2: prompt of 2, then 5 generated tokens (no EOS within max_new_tokens).
IDS = torch.tensor([[2, 3, 4, 2, 3, 4, 2], [4, 3, 2, 2, 4, EOS, PAD], [3, 3, 4, 2, 2, 3, 4]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 1, 1, 0], [1] * 7])
GENERATED_MASK = torch.tensor([[0] * 7, [0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
GENERATED = torch.tensor([False, True, True])
ON_POLICY = torch.tensor([True, False, False])  # labelled rows: the student wrote rows 1 and 2
ROW_2_BY_TEACHER = torch.tensor([True, False, True])  # the teacher wrote row 2: its tokens are labels
# what the engine builds: gold next tokens on the dataset row, generated next tokens on generated rows ...
LABELS = torch.tensor([[3, 4, 2, 3, 4, 2, X], [X, X, 2, 4, EOS, X, X], [X, 4, 2, 2, 3, 4, X]])
# ... and, for the scorer, the gold next tokens inside each generated row's prompt
PROMPT_LABELS = torch.tensor([[X] * 7, [3, 2, X, X, X, X, X], [3, X, X, X, X, X, X]])
LAM = torch.tensor([0.3, 0.8, 0.5])


def logits(seed: int) -> torch.Tensor:
    return torch.randn(3, 7, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def divergence(name: str):
    return get_registry().create("divergence", name)


def log_softmax_loop(row: torch.Tensor, tau: float) -> list[torch.Tensor]:
    z = [row[v] / tau for v in range(V)]
    log_norm = torch.log(sum(torch.exp(x) for x in z))
    return [x - log_norm for x in z]


def reference(student, teacher, name: str, labelled: torch.Tensor):
    """Per-sample (loss, observed ce, kd, observed confidence, tokens) by explicit loops over rows,
    positions and vocabulary."""
    out = []
    for i in range(3):
        kd_tokens, ce_tokens, seen_ce, seen_conf = [], [], [], []
        for t in range(7):
            if LABELS[i, t] != X:
                s, q = log_softmax_loop(student[i, t], TAU), log_softmax_loop(teacher[i, t], TAU)
                if name == "reverse-kl":
                    kd_tokens.append(sum(torch.exp(s[v]) * (s[v] - q[v]) for v in range(V)))
                else:
                    kd_tokens.append(sum(torch.exp(q[v]) * (q[v] - s[v]) for v in range(V)))
                ce_tokens.append(-log_softmax_loop(student[i, t], 1.0)[int(LABELS[i, t])])
            gold = PROMPT_LABELS[i, t] if GENERATED[i] else LABELS[i, t]  # the scorer sees gold text only
            if gold != X:
                logp = log_softmax_loop(student[i, t], 1.0)[int(gold)]
                seen_ce.append(-logp)
                seen_conf.append(torch.exp(logp))
        kd = TAU**2 * sum(kd_tokens) / len(kd_tokens)
        ce = sum(ce_tokens) / len(ce_tokens)
        loss = (1 - LAM[i]) * ce + LAM[i] * kd if labelled[i] else LAM[i] * kd
        out.append((loss, sum(seen_ce) / len(seen_ce), kd, sum(seen_conf) / len(seen_conf), len(kd_tokens)))
    return out


def test_the_hand_built_labels_are_what_generation_produces():
    gen = Generated(IDS[1:], MASK[1:], GENERATED_MASK[1:], torch.tensor([3, 2]))
    assert torch.equal(gen.labels(), LABELS[1:])
    assert torch.equal(gen.prompt_labels(), PROMPT_LABELS[1:])


def terms_of(student, teacher, name="reverse-kl"):
    return source_terms(
        student, LABELS, teacher, divergence(name), TAU, generated=GENERATED, prompt_labels=PROMPT_LABELS
    )


@pytest.mark.parametrize("labelled", [ON_POLICY, ROW_2_BY_TEACHER], ids=["on-policy", "teacher-wrote-row-2"])
@pytest.mark.parametrize("name", ["reverse-kl", "forward-kl"])
def test_mixed_batch_against_explicit_loops(name, labelled):
    student, teacher = logits(0).requires_grad_(True), logits(1)
    terms, observed = terms_of(student, teacher, name)
    loss = sample_losses(terms, LAM.double(), labelled)
    loss.sum().backward()

    ref_student = logits(0).requires_grad_(True)
    ref = reference(ref_student, teacher, name, labelled)
    torch.stack([r[0] for r in ref]).sum().backward()
    # float64 both ways; the two differ only in summation order: 1e-12 is ~1e4 ulps of these O(1) values
    for j, got in enumerate((loss, observed.ce, observed.kd, observed.confidence, observed.tokens)):
        expected = torch.stack([torch.as_tensor(r[j], dtype=torch.float64) for r in ref])
        torch.testing.assert_close(got.detach().double(), expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=0, atol=1e-12)
    # a generated row's prompt and padding receive no gradient: it trains on its generated tokens only
    assert (student.grad[1, [0, 1, 5, 6]] == 0).all() and (student.grad[2, [0, 6]] == 0).all()
    assert (student.grad[1, [2, 3, 4]] != 0).any(dim=-1).all()


def test_without_generated_rows_the_dataset_terms_bit_for_bit():
    student, teacher = logits(0).float().requires_grad_(True), logits(1).float()
    kl = divergence("forward-kl")
    terms, observed = source_terms(
        student, LABELS, teacher, kl, TAU, generated=torch.zeros(3, dtype=torch.bool)
    )
    assert observed is terms
    loss = sample_losses(terms, LAM, torch.ones(3, dtype=torch.bool))
    loss.sum().backward()
    grad = student.grad.clone()

    student.grad = None
    plain = per_sample_terms(student, LABELS, teacher, kl, TAU)
    plain_loss = (1 - LAM) * plain.ce + LAM * plain.kd  # the dataset step's formula
    plain_loss.sum().backward()
    for key in ("ce", "kd", "confidence", "tokens"):
        assert torch.equal(getattr(terms, key), getattr(plain, key))
    assert torch.equal(loss, plain_loss) and torch.equal(grad, student.grad)


def test_lambda_zero_makes_a_generated_row_count_nowhere():
    student, teacher = logits(0).requires_grad_(True), logits(1)
    lam = torch.tensor([0.3, 0.0, 0.5], dtype=torch.float64)
    terms, _ = terms_of(student, teacher)
    loss = sample_losses(terms, lam, ON_POLICY)
    assert loss[1] == 0 and math.isfinite(loss.sum().item())
    loss.sum().backward()
    assert (student.grad[1] == 0).all()


def test_prompt_labels_required_with_generated_rows():
    with pytest.raises(ValueError, match="prompt_labels are required"):
        source_terms(logits(0), LABELS, logits(1), divergence("reverse-kl"), TAU, generated=GENERATED)
