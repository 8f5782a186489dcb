"""The built-in divergences against formulas written out independently, in numpy on probabilities."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcore.errors import PluginError
from kdcore.plugins import get_registry

pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = ["forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-reverse-kl", "tvd"]


def make(name: str, **params):
    return get_registry().create("divergence", name, params)


def logps(seed: int, n: int = 7, v: int = 13, scale: float = 3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * scale, -1)
    t = torch.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * scale, -1)
    return s, t


def kl_np(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * np.log(p / q), axis=-1)


def reference(name: str, ps: np.ndarray, pt: np.ndarray, **params) -> np.ndarray:
    if name == "forward-kl":
        return kl_np(pt, ps)
    if name == "reverse-kl":
        return kl_np(ps, pt)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * pt + (1 - b) * ps
        return b * kl_np(pt, m) + (1 - b) * kl_np(ps, m)
    if name == "skew-kl":
        a = params.get("alpha", 0.1)
        return kl_np(pt, a * pt + (1 - a) * ps)
    if name == "skew-reverse-kl":
        a = params.get("alpha", 0.1)
        return kl_np(ps, a * ps + (1 - a) * pt)
    if name == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    raise AssertionError(name)


CASES = [
    ("forward-kl", {}),
    ("reverse-kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skew-kl", {}),
    ("skew-kl", {"alpha": 0.0}),
    ("skew-kl", {"alpha": 0.7}),
    ("skew-reverse-kl", {}),
    ("skew-reverse-kl", {"alpha": 0.0}),
    ("skew-reverse-kl", {"alpha": 0.7}),
    ("tvd", {}),
]


def test_all_registered_with_one_line_descriptions():
    registry = get_registry()
    assert set(NAMES) <= set(registry.names("divergence"))
    for name in NAMES:
        entry = registry.entry("divergence", name)
        assert entry.distribution == "kdcore"
        assert entry.description and "\n" not in entry.description


@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_independent_formula(name, params):
    div = make(name, **params)
    for seed in range(3):
        s, t = logps(seed)
        got = div.per_token(s, t)
        assert got.shape == (s.shape[0],)
        want = reference(name, s.exp().numpy(), t.exp().numpy(), **params)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_float32_close_to_float64(name, params):
    div = make(name, **params)
    s, t = logps(5)
    got = div.per_token(s.float(), t.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), div.per_token(s, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_non_negative_and_zero_on_equal(name, params):
    div = make(name, **params)
    for seed, scale in [(0, 1.0), (1, 10.0), (2, 30.0)]:
        s, t = logps(seed, n=32, v=50, scale=scale)
        assert (div.per_token(s, t) >= -1e-12).all()
        assert torch.all(div.per_token(t, t).abs() < 1e-12)
        s32 = s.float()
        assert torch.all(div.per_token(s32, s32).abs() < 1e-6)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_gradients_finite(name, params):
    div = make(name, **params)
    s, t = logps(3, scale=10.0)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(div.per_token(s, t).sum(), s)
    assert torch.isfinite(grad).all()


def test_skew_with_alpha_zero_is_plain_kl():
    s, t = logps(4)
    torch.testing.assert_close(make("skew-kl", alpha=0.0).per_token(s, t), make("forward-kl").per_token(s, t))
    torch.testing.assert_close(
        make("skew-reverse-kl", alpha=0.0).per_token(s, t), make("reverse-kl").per_token(s, t)
    )


def test_jsd_is_zero_at_both_ends_and_finite_gradient():
    s, t = logps(6)
    for beta in (0.0, 1.0):
        s_ = s.clone().requires_grad_(True)
        value = make("jsd", beta=beta).per_token(s_, t)
        assert torch.equal(value, torch.zeros_like(value))
        (grad,) = torch.autograd.grad(value.sum(), s_)
        assert torch.isfinite(grad).all()


def test_jsd_is_continuous_in_beta():
    s, t = logps(7, scale=5.0)

    def jsd(beta: float) -> torch.Tensor:
        return make("jsd", beta=beta).per_token(s, t)

    eps = 1e-6
    torch.testing.assert_close(jsd(eps), jsd(0.0), rtol=0, atol=1e-4)
    torch.testing.assert_close(jsd(1 - eps), jsd(1.0), rtol=0, atol=1e-4)
    # Near the ends it vanishes linearly, with the forward / reverse KL as slopes (a limit that is
    # reached once β is small against the probability ratios, hence mild logits here).
    s1, t1 = logps(8, scale=1.0)
    tiny = 1e-9
    slope0 = make("jsd", beta=tiny).per_token(s1, t1) / tiny
    slope1 = make("jsd", beta=1 - tiny).per_token(s1, t1) / tiny
    torch.testing.assert_close(slope0, make("forward-kl").per_token(s1, t1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(slope1, make("reverse-kl").per_token(s1, t1), rtol=1e-4, atol=1e-6)
    # No jump anywhere on a grid: neighbouring values differ by a small amount.
    grid = np.linspace(0.0, 1.0, 201)
    values = torch.stack([jsd(float(b)) for b in grid])
    assert (values[1:] - values[:-1]).abs().max() < 0.05 * values.max()


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("jsd", {"beta": 2}, "beta"),
        ("jsd", {"beta": -0.1}, "beta"),
        ("skew-kl", {"alpha": 1.0}, "alpha"),
        ("skew-reverse-kl", {"alpha": -0.5}, "alpha"),
        ("jsd", {"alpha": 0.1}, "alpha"),
        ("tvd", {"beta": 0.5}, "beta"),
        ("forward-kl", {"temperature": 2}, "temperature"),
    ],
)
def test_bad_params_are_rejected_by_field(name, params, field):
    with pytest.raises(PluginError, match=field) as info:
        make(name, **params)
    assert name in str(info.value)


def test_plugin_module_does_not_import_torch_at_top_level():
    import kd_builtin.divergences as module

    tree = ast.parse(Path(module.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("torch") for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torch")


def test_extreme_logits_stay_finite():
    # Very peaked distributions: probabilities underflow to 0 but log-probs stay finite.
    s = torch.log_softmax(torch.tensor([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]]), -1)
    t = torch.log_softmax(torch.tensor([[-200.0, 0.0, 200.0], [50.0, -50.0, 0.0]]), -1)
    for name, params in CASES:
        value = make(name, **params).per_token(s, t)
        assert torch.isfinite(value).all(), (name, params, value)
    assert math.isclose(float(make("tvd").per_token(s, t)[0]), 1.0, rel_tol=1e-6)
