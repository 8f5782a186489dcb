"""Reliance policies: mappings at chosen points, unknown-difficulty defaults, stages, validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from kdcore.errors import PluginError
from kdcore.plugins import get_registry

NAN = math.nan
RELIANCES = get_registry().names("reliance")


def create(name: str, **params):
    return get_registry().create("reliance", name, params)


def lam(policy, ranks, scores=None, progress=0.5) -> list[float]:
    rank = torch.tensor(ranks, dtype=torch.float32)
    score = rank.clone() if scores is None else torch.tensor(scores, dtype=torch.float32)
    out = policy.weights(rank, score, progress)
    assert out.dtype == torch.float32 and out.shape == rank.shape
    return out.tolist()


def test_builtins_are_registered():
    assert set(RELIANCES) >= {"fixed", "none", "threshold", "continuous", "staged"}


@pytest.mark.parametrize("name", RELIANCES)
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_every_policy_gives_float32_lambdas_in_range_for_any_rank(name, progress):
    policy = create(name)
    rank = torch.tensor([[0.0, 0.2, NAN], [0.5, 1.0, NAN]])
    score = torch.tensor([[-3.0, 0.1, NAN], [2.0, 7.5, NAN]])
    out = policy.weights(rank, score, progress)
    assert out.dtype == torch.float32 and out.shape == rank.shape
    assert not torch.isnan(out).any()
    assert ((out >= 0) & (out <= 1)).all()
    assert isinstance(policy.temperature(2.0, progress), float)
    empty = policy.weights(torch.empty(0), torch.empty(0), progress)
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize("name", RELIANCES)
def test_every_policy_has_summary_and_rejects_unknown_params(name):
    entry = get_registry().entry("reliance", name)
    assert entry.description and "\n" not in entry.description
    with pytest.raises(PluginError, match="bogus"):
        create(name, bogus=1)


def test_fixed_and_none():
    assert lam(create("fixed", value=0.3), [0.0, 1.0, NAN]) == pytest.approx([0.3] * 3)
    assert lam(create("none"), [0.0, NAN]) == [0.0, 0.0]


# --- threshold --------------------------------------------------------------------------------


def test_threshold_on_rank():
    policy = create("threshold")  # quantile 0.5, hard 0.9, easy 0.1
    assert lam(policy, [0.0, 0.49, 0.5, 0.51, 1.0]) == pytest.approx([0.1, 0.1, 0.9, 0.9, 0.9])
    policy = create("threshold", quantile=0.8, lambda_hard=1.0, lambda_easy=0.0)
    assert lam(policy, [0.79, 0.8, 1.0]) == pytest.approx([0.0, 1.0, 1.0])


def test_threshold_unknown_rank_gets_quantile_weighted_mean():
    assert lam(create("threshold"), [NAN, 0.0]) == pytest.approx([0.5, 0.1])
    # (1 − 0.25)·0.9 + 0.25·0.1 = 0.7
    assert lam(create("threshold", quantile=0.25), [NAN]) == pytest.approx([0.7])
    assert lam(create("threshold", lambda_unknown=0.0), [NAN, 1.0]) == pytest.approx([0.0, 0.9])
    # the default equals the mean λ over a uniform rank
    policy = create("threshold", quantile=0.3, lambda_hard=0.8, lambda_easy=0.2)
    grid = torch.linspace(0, 1, 100_001)
    mean = policy.weights(grid, grid, 0.5).double().mean().item()
    assert lam(policy, [NAN])[0] == pytest.approx(mean, abs=1e-4)


def test_threshold_on_raw_score():
    policy = create("threshold", on="score", score_threshold=2.0)
    # rank is ignored: only the raw score counts; NaN score -> the default 0.5
    out = lam(policy, [0.0, 1.0, 0.0, 0.9], scores=[1.0, 1.9, 2.0, NAN])
    assert out == pytest.approx([0.1, 0.1, 0.9, 0.5])


def test_threshold_invert_gives_the_teacher_to_the_easy_samples():
    # quantile 0.7: normally ranks ≥ 0.7 (the hardest 30 %) get 0.9; inverted, ranks ≤ 0.3 (the easiest 30 %) do
    policy = create("threshold", quantile=0.7, invert=True)
    assert lam(policy, [0.0, 0.1, 0.29, 0.31, 0.69, 0.71, 1.0]) == pytest.approx(
        [0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]
    )
    # the same share gets each λ, so the unknown default (the mean over a uniform rank) is unchanged:
    # 0.3·0.9 + 0.7·0.1 = 0.34
    assert lam(policy, [NAN]) == pytest.approx([0.34])
    grid = torch.linspace(0, 1, 100_001)
    assert policy.weights(grid, grid, 0.5).double().mean().item() == pytest.approx(0.34, abs=1e-4)
    # on the raw score: at or below the cut is "hard"; the assumed share below it (quantile 0.7) gets 0.9
    policy = create("threshold", on="score", score_threshold=2.0, quantile=0.7, invert=True)
    out = lam(policy, [0.0, 1.0, 0.0, 0.9], scores=[1.0, 2.0, 2.1, NAN])
    assert out == pytest.approx([0.9, 0.9, 0.1, 0.7 * 0.9 + 0.3 * 0.1])


def test_threshold_on_score_needs_a_threshold():
    with pytest.raises(PluginError, match="score_threshold") as info:
        create("threshold", on="score")
    assert "reliance 'threshold'" in str(info.value)


# --- continuous -------------------------------------------------------------------------------

RANKS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_continuous_linear():
    assert lam(create("continuous"), RANKS) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    policy = create("continuous", lambda_min=0.0, lambda_max=1.0)
    assert lam(policy, RANKS) == pytest.approx(RANKS)


def test_continuous_power():
    # 0.1 + 0.8·r²
    assert lam(create("continuous", mapping="power"), RANKS) == pytest.approx([0.1, 0.15, 0.3, 0.55, 0.9])
    # 0.1 + 0.8·r³ at 0.5 = 0.2
    assert lam(create("continuous", mapping="power", exponent=3), [0.5]) == pytest.approx([0.2])


def test_continuous_sigmoid():
    # f(r) = (σ(10(r − ½)) − σ(−5)) / (σ(5) − σ(−5)); σ(5) = 0.9933071490757153
    lo, hi = 1 - 0.9933071490757153, 0.9933071490757153
    f_quarter = (0.07585818002124355 - lo) / (hi - lo)  # σ(−2.5) = 0.0758581800…
    expected = [0.1, 0.1 + 0.8 * f_quarter, 0.5, 0.9 - 0.8 * f_quarter, 0.9]
    assert lam(create("continuous", mapping="sigmoid"), RANKS) == pytest.approx(expected, abs=1e-6)
    # centre 0: f(r) = (σ(s·r) − ½)/(σ(s) − ½); at s = 2, r = 0.5: (σ(1) − ½)/(σ(2) − ½)
    policy = create("continuous", mapping="sigmoid", centre=0.0, sharpness=2.0, lambda_min=0, lambda_max=1)
    expected_half = (0.7310585786300049 - 0.5) / (0.8807970779778823 - 0.5)
    assert lam(policy, [0.0, 0.5, 1.0]) == pytest.approx([0.0, expected_half, 1.0], abs=1e-6)


def test_continuous_invert_mirrors_the_ranks():
    # linear: 0.1 + 0.8·(1 − r)
    assert lam(create("continuous", invert=True), RANKS) == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1])
    # power: 0.1 + 0.8·(1 − r)², not 0.9 − 0.8·r²: the same λ values as without invert, mirrored
    policy = create("continuous", mapping="power", invert=True)
    assert lam(policy, RANKS) == pytest.approx([0.9, 0.55, 0.3, 0.15, 0.1])
    assert lam(policy, [NAN]) == pytest.approx([0.1 + 0.8 / 3])  # the mean of r² over [0, 1] is ⅓, as before


def test_continuous_clamps_rank():
    assert lam(create("continuous"), [-0.5, 1.5]) == pytest.approx([0.1, 0.9])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, 0.5),  # linear: mean ½
        ({"mapping": "power"}, 0.1 + 0.8 / 3),  # mean r² = ⅓
        ({"mapping": "power", "exponent": 0.5}, 0.1 + 0.8 * 2 / 3),
        ({"mapping": "sigmoid"}, 0.5),  # symmetric about ½
        ({"lambda_unknown": 0.25}, 0.25),
        ({"lambda_min": 0.9, "lambda_max": 0.1}, 0.5),  # decreasing reliance is allowed
    ],
)
def test_continuous_unknown_rank_gets_mean(params, expected):
    assert lam(create("continuous", **params), [NAN]) == pytest.approx([expected])


@pytest.mark.parametrize(
    "params",
    [
        {"mapping": "sigmoid", "centre": 0.2},
        {"mapping": "sigmoid", "centre": 0.9, "sharpness": 50},
        {"mapping": "sigmoid", "centre": 0.5, "sharpness": 0.1},
        {"mapping": "power", "exponent": 7},
    ],
)
def test_continuous_unknown_default_matches_the_grid_mean(params):
    policy = create("continuous", **params)
    grid = torch.linspace(0, 1, 200_001)
    mean = torch.trapezoid(policy.f(grid), grid).item()
    expected = 0.1 + 0.8 * mean
    assert policy.mean_f() == pytest.approx(mean, abs=1e-6)
    assert lam(policy, [NAN])[0] == pytest.approx(expected, abs=1e-6)


# --- staged -----------------------------------------------------------------------------------


def test_staged_stage_boundaries_and_temperature():
    policy = create("staged")
    cases = [
        (0.0, 0.7, 1.0),
        (0.2499, 0.7, 1.0),
        (0.25, 0.8, 1.33),
        (0.5, 0.9, 1.67),
        (0.7499, 0.9, 1.67),
        (0.75, 1.0, 2.0),
        (1.0, 1.0, 2.0),  # stage index clamps at k − 1
    ]
    for progress, want_lam, want_tau in cases:
        assert lam(policy, [0.0, 1.0, NAN], progress=progress) == pytest.approx([want_lam] * 3)
        assert policy.temperature(3.0, progress) == pytest.approx(want_tau)


def test_staged_without_temperatures_keeps_base():
    policy = create("staged", lambdas=[0.2, 0.6], temperatures=None)
    assert policy.temperature(2.5, 0.9) == 2.5
    assert lam(policy, [0.3], progress=0.49) == pytest.approx([0.2])
    assert lam(policy, [0.3], progress=0.5) == pytest.approx([0.6])


def test_staged_multiply_with_inner_policy():
    policy = create("staged", combine="multiply", inner="continuous", inner_params={"lambda_min": 0.0})
    # stage λ 0.8 at progress 0.3 × (0 + 0.9·r); unknown -> 0.8 × 0.45
    assert lam(policy, [0.0, 0.5, 1.0, NAN], progress=0.3) == pytest.approx([0.0, 0.36, 0.72, 0.36])
    assert policy.temperature(2.0, 0.3) == pytest.approx(1.33)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"lambdas": [0.5, 1.2]}, "lambdas"),
        ({"lambdas": []}, "lambdas"),
        ({"temperatures": [1.0, 2.0]}, "temperatures"),
        ({"temperatures": [1.0, 0.0, 1.0, 1.0]}, "temperatures"),
        ({"combine": "multiply"}, "inner"),
        ({"inner": "continuous"}, "inner"),
        ({"combine": "add"}, "combine"),
    ],
)
def test_staged_validation(params, field):
    with pytest.raises(PluginError, match=field) as info:
        create("staged", **params)
    assert "reliance 'staged'" in str(info.value)


def test_staged_inner_errors_name_the_inner_policy():
    with pytest.raises(PluginError, match=r"staged.*inner.*unknown reliance 'nope'"):
        create("staged", combine="multiply", inner="nope")
    with pytest.raises(PluginError, match=r"staged.*inner.*quantile"):
        create("staged", combine="multiply", inner="threshold", inner_params={"quantile": 2})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("threshold", {"quantile": 2}, "quantile"),
        ("threshold", {"lambda_hard": -0.1}, "lambda_hard"),
        ("threshold", {"on": "loss"}, "on"),
        ("threshold", {"lambda_unknown": 1.5}, "lambda_unknown"),
        ("continuous", {"mapping": "cubic"}, "mapping"),
        ("continuous", {"sharpness": 0}, "sharpness"),
        ("continuous", {"exponent": 0}, "exponent"),
        ("continuous", {"centre": 1.1}, "centre"),
        ("fixed", {"value": 2}, "value"),
    ],
)
def test_validation_errors_name_the_field(name, params, field):
    with pytest.raises(PluginError, match=f"{field}:") as info:
        create(name, **params)
    assert f"reliance '{name}'" in str(info.value)


def test_reliance_module_does_not_import_torch():
    code = "import sys, kd_builtin.reliance; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
