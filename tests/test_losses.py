"""Per-sample CE / KD terms against direct, unchunked computations with torch.nn.functional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcore.plugins import get_registry
from kdcore.training.losses import SampleTerms, per_sample_terms, token_nll_sum

B, T, V = 4, 9, 17


pytestmark = pytest.mark.usefixtures("one_thread")


def divergence(name: str = "forward-kl", **params):
    return get_registry().create("divergence", name, params)


def batch(seed: int = 0, vs: int = V, vt: int = V, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, vs, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(B, T, vt, generator=g) * 2
    labels = torch.randint(0, vs, (B, T), generator=g)
    if pad:
        labels[0, 6:] = -100  # right padding
        labels[1, :2] = -100  # left padding / prompt
        labels[1, 4] = -100  # a hole in the middle
        labels[3] = -100  # a sample with no valid token at all
    return student, teacher, labels


def reference_kd(student, teacher, labels, tau: float) -> torch.Tensor:
    """τ² · per-sample mean over valid tokens of KL(P_T^τ ‖ P_S^τ) on the shared vocabulary prefix."""
    shared = min(student.shape[-1], teacher.shape[-1])
    s_logp = F.log_softmax(student[..., :shared].double() / tau, -1)
    t_logp = F.log_softmax(teacher[..., :shared].double() / tau, -1)
    kl = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)  # [B, T]
    mask = (labels != -100).double()
    return tau**2 * (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


def reference_ce(student, labels) -> torch.Tensor:
    ce = F.cross_entropy(student.double().transpose(1, 2), labels, reduction="none")  # [B, T], 0 at -100
    mask = (labels != -100).double()
    return ce.sum(1) / mask.sum(1).clamp(min=1)


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=atol)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("pad", [True, False])
def test_kd_and_ce_match_direct_computation(tau, pad):
    student, teacher, labels = batch(pad=pad)
    terms = per_sample_terms(student, labels, teacher, divergence(), temperature=tau, chunk_tokens=5)
    assert isinstance(terms, SampleTerms)
    for value in (terms.ce, terms.kd, terms.confidence, terms.tokens):
        assert value.shape == (B,)
        assert torch.isfinite(value).all()
    close(terms.kd, reference_kd(student, teacher, labels, tau))
    close(terms.ce, reference_ce(student, labels))
    close(terms.tokens, (labels != -100).sum(1).double(), atol=0)
    assert terms.ce.requires_grad and terms.kd.requires_grad
    assert not terms.confidence.requires_grad and not terms.tokens.requires_grad


def test_gradients_match_direct_computation():
    student, teacher, labels = batch(1)
    weights = torch.tensor([0.3, 0.5, 0.9, 0.2])  # per-sample λ, as the engine uses them
    terms = per_sample_terms(student, labels, teacher, divergence(), temperature=2.0, chunk_tokens=4)
    loss = ((1 - weights) * terms.ce + weights * terms.kd).mean()
    (got,) = torch.autograd.grad(loss, student)
    ref_loss = (
        (1 - weights) * reference_ce(student, labels) + weights * reference_kd(student, teacher, labels, 2.0)
    ).mean()
    (want,) = torch.autograd.grad(ref_loss, student)
    close(got, want, atol=1e-6)
    assert torch.equal(got[3], torch.zeros_like(got[3]))  # the all-padding sample gets no gradient
    assert torch.equal(got[0, 6:], torch.zeros_like(got[0, 6:]))  # nor do padding positions


def test_confidence_is_mean_gold_probability_at_temperature_one():
    student, teacher, labels = batch(2)
    terms = per_sample_terms(student, labels, teacher, divergence(), temperature=3.0)
    probs = student.detach().softmax(-1)
    gold = probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = (labels != -100).float()
    close(terms.confidence, (gold * mask).sum(1) / mask.sum(1).clamp(min=1), atol=1e-6)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("name", ["forward-kl", "jsd", "tvd"])
def test_chunking_gives_identical_values_and_gradients(pad, name):
    student, teacher, labels = batch(3, pad=pad)
    teacher.requires_grad_(True)
    results = []
    for chunk in (None, 3, 1, 1000):
        terms = per_sample_terms(
            student, labels, teacher, divergence(name), temperature=2.0, chunk_tokens=chunk
        )
        loss = (terms.ce * torch.arange(1.0, B + 1)).sum() + (terms.kd * torch.arange(2.0, B + 2)).sum()
        grads = torch.autograd.grad(loss, (student, teacher))
        results.append((terms, grads))
    (ref, (ref_gs, ref_gt)), *others = results
    for terms, (gs, gt) in others:
        for field in ("ce", "confidence", "tokens"):
            assert torch.equal(getattr(terms, field), getattr(ref, field)), field
        if name == "forward-kl":  # the default: bit-for-bit the same
            assert torch.equal(terms.kd, ref.kd)
            assert torch.equal(gs, ref_gs)
            assert torch.equal(gt, ref_gt)
        else:
            # Some elementwise kernels (e.g. logaddexp) take a SIMD or a scalar path depending on a
            # tensor's size, so results may differ in the last bit between chunkings.
            torch.testing.assert_close(terms.kd, ref.kd, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gs, ref_gs, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gt, ref_gt, rtol=1e-6, atol=1e-7)


def test_chunks_save_only_views_of_the_logits_for_backward(monkeypatch):
    """Nothing of size [tokens, vocab] is kept for the backward except views of the inputs."""
    monkeypatch.setattr(
        "kdcore.training.losses.CHECKPOINT_MIN_ELEMENTS", 0
    )  # checkpoint even these tiny chunks
    student, teacher, labels = batch(4, vs=64, vt=64)
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    big: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= 64:
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = per_sample_terms(student, labels, teacher, divergence("jsd"), temperature=2.0, chunk_tokens=4)
    assert big  # the chunks' inputs
    assert all(t.untyped_storage().data_ptr() in inputs for t in big)
    (terms.ce + terms.kd).sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("vs", "vt"), [(V, V + 7), (V + 7, V)])
def test_vocab_mismatch_uses_shared_prefix_for_kd_and_full_student_vocab_for_ce(vs, vt):
    student, teacher, labels = batch(5, vs=vs, vt=vt)
    terms = per_sample_terms(student, labels, teacher, divergence(), temperature=2.0, chunk_tokens=3)
    close(terms.kd, reference_kd(student, teacher, labels, 2.0))
    close(terms.ce, reference_ce(student, labels))
    # The extra teacher columns are ignored entirely.
    if vt > vs:
        shifted = teacher.clone()
        shifted[..., vs:] += 100.0
        again = per_sample_terms(student, labels, shifted, divergence(), temperature=2.0)
        close(again.kd, terms.kd, atol=1e-6)


def test_all_padding_gives_zeros_without_nan():
    student, teacher, labels = batch(6)
    labels[:] = -100
    terms = per_sample_terms(student, labels, teacher, divergence(), temperature=2.0)
    for field in ("ce", "kd", "confidence", "tokens"):
        assert torch.equal(getattr(terms, field), torch.zeros(B)), field
    (terms.ce + terms.kd).sum().backward()  # still attached to the graph
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_without_teacher_kd_is_zero_and_ce_unchanged():
    student, _, labels = batch(7)
    terms = per_sample_terms(student, labels, chunk_tokens=2)
    assert torch.equal(terms.kd, torch.zeros(B))
    close(terms.ce, reference_ce(student, labels))
    terms.ce.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_no_grad_mode_and_half_precision_inputs():
    student, teacher, labels = batch(8)
    with torch.no_grad():
        terms = per_sample_terms(student, labels, teacher, divergence(), temperature=2.0, chunk_tokens=3)
    assert not terms.ce.requires_grad
    close(terms.kd, reference_kd(student, teacher, labels, 2.0))
    bf = per_sample_terms(
        student.detach().bfloat16(), labels, teacher.bfloat16(), divergence(), temperature=2.0
    )
    assert bf.kd.dtype == torch.float32
    close(bf.kd, reference_kd(student.bfloat16(), teacher.bfloat16(), labels, 2.0), atol=1e-4)


def test_float64_is_kept_and_non_contiguous_logits_work():
    _, teacher, labels = batch(11)
    wide = torch.randn(B, T + 1, V, dtype=torch.float64)
    sliced = wide[:, :-1]  # non-contiguous: correct, though it costs a copy
    terms = per_sample_terms(sliced, labels, teacher.double(), divergence(), temperature=2.0, chunk_tokens=3)
    assert terms.ce.dtype == terms.kd.dtype == torch.float64
    torch.testing.assert_close(terms.kd, reference_kd(sliced, teacher, labels, 2.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms.ce, reference_ce(sliced, labels), rtol=1e-10, atol=1e-12)


def test_argument_errors():
    student, teacher, labels = batch(9)
    with pytest.raises(TypeError, match="divergence"):
        per_sample_terms(student, labels, teacher)
    with pytest.raises(ValueError, match="chunk_tokens"):
        per_sample_terms(student, labels, teacher, divergence(), chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        per_sample_terms(student, labels, teacher, divergence(), temperature=0.0)
    with pytest.raises(ValueError):
        per_sample_terms(student, labels[:, :-1], teacher, divergence())
    with pytest.raises(ValueError):
        per_sample_terms(student, labels, teacher[:, :-1], divergence())


@pytest.mark.parametrize("chunk", [None, 2, 2048])
def test_token_nll_sum_matches_cross_entropy(chunk):
    student, _, labels = batch(10)
    total, count = token_nll_sum(student, labels, chunk_tokens=chunk)
    assert total.dim() == 0 and count.dim() == 0
    assert not total.requires_grad
    want = F.cross_entropy(student.detach().reshape(-1, V), labels.reshape(-1), reduction="sum")
    close(total, want, atol=1e-4)
    assert int(count) == int((labels != -100).sum())
    labels[:] = -100
    total, count = token_nll_sum(student, labels)
    assert float(total) == 0.0 and int(count) == 0
