"""The fused LM-head loss equals per_sample_terms on the full logits, in values and gradients.

Tolerance 1e-5 in float32: both paths do the same arithmetic on the same numbers, the fused one on
row subsets and in chunks, so only the order of float32 sums differs (the projection's blocking,
the index_add over chunks): ~1e-7 relative per operation over sums of at most a few hundred
terms, well under 1e-5; a wrong mask, scale or τ² moves values by 1e-2 and more. float64 runs
check the gradients against finite differences (gradcheck), independently of the unfused path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import topk_teacher_in_memory

from kdcore.plugins import get_registry
from kdcore.training.fused_loss import final_hidden_states, fused_sample_terms, linear_head
from kdcore.training.losses import SampleTerms, TopKTeacher, per_sample_terms

B, T, H, HT = 3, 9, 16, 24


def divergence(name: str, **params):
    return get_registry().create("divergence", name, params)


def make(vs=41, vt=41, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(vs, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(vs, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    th = torch.randn(B, T, HT, generator=g, dtype=dtype)
    tw = torch.randn(vt, HT, generator=g, dtype=dtype) * 0.5
    tb = torch.randn(vt, generator=g, dtype=dtype) * 0.1 if bias else None
    labels = torch.randint(0, min(vs, vt), (B, T), generator=g)
    labels[0, 6:] = -100  # padding at the end
    labels[1, :2] = -100  # masked prompt tokens
    labels[1, 5] = -100
    lam = torch.rand(B, generator=g, dtype=dtype)
    return h, w, b, th, tw, tb, labels, lam


def make_plain(**kwargs):
    """:func:`make` without biases: ``(h, w, th, tw, labels, lam)``."""
    h, w, _, th, tw, _, labels, lam = make(**kwargs)
    return h, w, th, tw, labels, lam


def reference(h, w, b, th, tw, tb, labels, div, tau) -> SampleTerms:
    return per_sample_terms(F.linear(h, w, b), labels, F.linear(th, tw, tb), div, tau, chunk_tokens=None)


def grads(terms, lam, params, ce_weight=None, kd_weight=None):
    ce_weight = 1 - lam if ce_weight is None else ce_weight
    kd_weight = lam if kd_weight is None else kd_weight
    loss = (ce_weight * terms.ce + kd_weight * terms.kd).sum() * 0.37  # any outer scale
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def assert_same(fused: SampleTerms, ref: SampleTerms) -> None:
    for key in ("ce", "kd", "confidence", "tokens"):
        torch.testing.assert_close(getattr(fused, key), getattr(ref, key), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["forward-kl", "reverse-kl", "jsd", "skew-kl", "tvd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("mode", ["recompute", "forward-gradient"])
def test_values_and_gradients_equal_the_unfused_loss(name, tau, mode):
    h, w, b, th, tw, tb, labels, lam = make(bias=True)
    div = divergence(name)
    ref = reference(h, w, b, th, tw, tb, labels, div, tau)
    weights = (1 - lam, lam) if mode == "forward-gradient" else None
    fused = fused_sample_terms(
        h, w, labels, th, tw, div, tau, student_bias=b, teacher_bias=tb, chunk_tokens=4, loss_weights=weights
    )
    assert_same(fused, ref)
    assert fused.kd.abs().min() > 0 or name == "tvd"  # a real KD term, not zeros
    for got, want in zip(grads(fused, lam, [h, w, b]), grads(ref, lam, [h, w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 1000, None])
def test_chunk_sizes_agree(chunk):
    h, w, _b, th, tw, _tb, labels, lam = make()
    div = divergence("forward-kl")
    ref = reference(h, w, None, th, tw, None, labels, div, 2.0)
    fused = fused_sample_terms(
        h, w, labels, th, tw, div, 2.0, chunk_tokens=chunk, loss_weights=(1 - lam, lam)
    )
    assert_same(fused, ref)
    for got, want in zip(grads(fused, lam, [h, w]), grads(ref, lam, [h, w]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_announced_weights_not_used_falls_back_to_recomputing():
    """The caller announced (1 − λ, λ) but differentiates another combination: gradients stay exact."""
    h, w, th, tw, labels, lam = make_plain(seed=3)
    div = divergence("jsd")
    ref = reference(h, w, None, th, tw, None, labels, div, 2.0)
    fused = fused_sample_terms(h, w, labels, th, tw, div, 2.0, chunk_tokens=4, loss_weights=(1 - lam, lam))
    other = torch.tensor([1.0, 0.0, 2.0])
    for got, want in zip(
        grads(fused, lam, [h, w], other, lam), grads(ref, lam, [h, w], other, lam), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ce_only_and_vocabulary_mismatch():
    h, w, b, th, tw, _tb, labels, lam = make(vs=41, vt=47, bias=True, seed=5)
    ce_only = fused_sample_terms(h, w, labels, student_bias=b, chunk_tokens=3, loss_weights=(1 - lam, lam))
    ref = per_sample_terms(F.linear(h, w, b), labels)
    assert_same(ce_only, ref)
    assert torch.equal(ce_only.kd, torch.zeros(B))
    g_fused = torch.autograd.grad(ce_only.ce.sum(), [h, w, b])
    g_ref = torch.autograd.grad(ref.ce.sum(), [h, w, b])
    for got, want in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for vs, vt in ((41, 47), (47, 41)):  # KD over the shared prefix, either way round
        h, w, th, tw, labels, lam = make_plain(vs=vs, vt=vt, seed=6)
        div = divergence("forward-kl")
        ref = reference(h, w, None, th, tw, None, labels, div, 2.0)
        fused = fused_sample_terms(h, w, labels, th, tw, div, 2.0, chunk_tokens=4)
        assert_same(fused, ref)
        for got, want in zip(grads(fused, lam, [h, w]), grads(ref, lam, [h, w]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_valid_token():
    h, w, th, tw, labels, _ = make_plain()
    labels = torch.full_like(labels, -100)
    fused = fused_sample_terms(h, w, labels, th, tw, divergence("forward-kl"), 2.0)
    for key in ("ce", "kd", "confidence", "tokens"):
        assert torch.equal(getattr(fused, key), torch.zeros(B)), key
    (fused.ce.sum() + fused.kd.sum()).backward()  # attached to the graph, zero gradients
    assert not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("weights", [False, True])
def test_gradcheck_float64(weights, one_thread):
    """Finite differences, independent of the unfused path (float64, where they are accurate)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    tw = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    labels[1, 3] = -100
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64)
    div = divergence("jsd")

    def loss(h, w, b):
        terms = fused_sample_terms(
            h, w, labels, th, tw, div, 2.0, student_bias=b, chunk_tokens=3,
            loss_weights=(1 - lam, lam) if weights else None,
        )  # fmt: skip
        return ((1 - lam) * terms.ce + lam * terms.kd).sum()

    assert torch.autograd.gradcheck(loss, (h, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("weights", "projections"), [(True, 3), (False, 6)])
def test_announced_weights_save_the_recomputation(monkeypatch, weights, projections):
    """With the weights announced, each chunk's student logits are computed once, not twice."""
    from kdcore.training import fused_loss

    h, w, th, tw, labels, lam = make_plain(seed=2)  # 21 valid tokens: chunks of 8, 8 and 5
    calls = []
    real = fused_loss._logits

    def counting(x, weight, bias, dtype):
        calls.append(weight.shape[1] == H)  # True for the student's head
        return real(x, weight, bias, dtype)

    monkeypatch.setattr(fused_loss, "_logits", counting)
    terms = fused_sample_terms(
        h, w, labels, th, tw, divergence("forward-kl"), 2.0, chunk_tokens=8,
        loss_weights=(1 - lam, lam) if weights else None,
    )  # fmt: skip
    ((1 - lam) * terms.ce + lam * terms.kd).sum().mul(4.0).backward()
    assert int((labels != -100).sum()) == 21
    assert sum(calls) == projections


def test_errors():
    h, w, th, tw, labels, _ = make_plain()
    with pytest.raises(TypeError, match="divergence"):
        fused_sample_terms(h, w, labels, th, tw)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_sample_terms(h, w, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        fused_sample_terms(h, w, labels, temperature=0.0)
    with pytest.raises(ValueError, match="student_head"):
        fused_sample_terms(h, w[:, :-1], labels)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_model_helpers_reproduce_the_logits(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = (
        {"n_embd": 16, "n_layer": 1, "n_head": 2}
        if model_type == "gpt2"
        else {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    )
    config = AutoConfig.for_model(model_type, vocab_size=40, bos_token_id=0, eos_token_id=0, **sizes)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    weight, bias = linear_head(model)
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, mask)
        torch.testing.assert_close(
            F.linear(hidden, weight, bias), model(input_ids=ids, attention_mask=mask).logits
        )


def test_linear_head_refuses_soft_capped_logits():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2", vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    )  # fmt: skip
    assert linear_head(AutoModelForCausalLM.from_config(config)) is None


def topk_teacher(teacher_logits: torch.Tensor, k: int) -> TopKTeacher:
    """What a teacher cache stores, in memory, in float32 (the dtype the cache keeps)."""
    return topk_teacher_in_memory(teacher_logits, k, torch.float32)


@pytest.mark.parametrize("name", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize(
    ("tau", "k", "vs", "vt"), [(1.0, 8, 41, 41), (2.0, 8, 41, 41), (2.0, 41, 41, 41), (1.5, 8, 37, 41)]
)
@pytest.mark.parametrize("mode", ["recompute", "forward-gradient"])
def test_a_top_k_teacher_equals_the_logits_path_with_the_cache(name, tau, k, vs, vt, mode):
    """The fused student against a cache's sparse teacher: the values and gradients of per_sample_terms on
    the student's full logits with the same TopKTeacher (K < V with its tail, K = V without; τ = 2 exact
    tail, τ = 1.5 the interpolated one; a student vocabulary shorter than the teacher's)."""
    h, w, b, th, tw, tb, labels, lam = make(vs=vs, vt=vt, bias=True, seed=7)
    teacher = topk_teacher(F.linear(th, tw, tb), k)
    div = divergence(name)
    ref = per_sample_terms(F.linear(h, w, b), labels, teacher, div, tau, chunk_tokens=None)
    weights = (1 - lam, lam) if mode == "forward-gradient" else None
    fused = fused_sample_terms(
        h,
        w,
        labels,
        None,
        None,
        div,
        tau,
        student_bias=b,
        chunk_tokens=4,
        loss_weights=weights,
        teacher_topk=teacher,
    )
    assert_same(fused, ref)
    assert fused.kd.abs().min() > 0
    for got, want in zip(grads(fused, lam, [h, w, b]), grads(ref, lam, [h, w, b]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_top_k_teacher_is_refused_with_a_dense_one_or_without_a_divergence():
    h, w, th, tw, labels, _ = make_plain()
    teacher = topk_teacher(F.linear(th, tw), 8)
    with pytest.raises(TypeError, match="not both"):
        fused_sample_terms(h, w, labels, th, tw, divergence("forward-kl"), teacher_topk=teacher)
    with pytest.raises(TypeError, match="needs a divergence"):
        fused_sample_terms(h, w, labels, teacher_topk=teacher)


@pytest.mark.parametrize("mode", ["recompute", "forward-gradient"])
def test_under_bf16_autocast_the_heads_project_in_bf16_and_the_loss_sums_in_float32(monkeypatch, mode):
    """Under autocast the projections run in bf16 and the rest in float32: values and gradients in float32
    and within bf16's precision of the float32 ones. Tolerance: a logit is one product of two factors each
    rounded to bf16 (unit roundoff u = 2⁻⁹) and rounded again as a bf16 result, ≤ 3u relative; CE and the
    divergence change by at most about twice a logit's error, so 8u relative (with that much absolute on
    values near 0) on the per-sample terms and, in norm, on each gradient, which passes through one more
    bf16 product."""
    from kdcore.training import fused_loss

    u = 2.0**-9
    h, w, b, th, tw, tb, labels, lam = make(bias=True, seed=9)
    div = divergence("forward-kl")
    weights = (1 - lam, lam) if mode == "forward-gradient" else None
    args = (h, w, labels, th, tw, div, 2.0)
    kwargs = {"student_bias": b, "teacher_bias": tb, "chunk_tokens": 4, "loss_weights": weights}
    exact = fused_sample_terms(*args, **kwargs)
    projected = []
    real = fused_loss._logits
    monkeypatch.setattr(fused_loss, "_logits", lambda *a: projected.append(a[1].dtype) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused_sample_terms(*args, **kwargs)
        low_grads = grads(low, lam, [h, w, b])
    assert set(projected) == {torch.bfloat16}
    for key in ("ce", "kd", "confidence"):
        got, want = getattr(low, key), getattr(exact, key)
        assert got.dtype == torch.float32, key
        torch.testing.assert_close(got, want, rtol=8 * u, atol=8 * u, msg=key)
    for got, want in zip(low_grads, grads(exact, lam, [h, w, b]), strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 8 * u * want.norm()
