"""Pacing functions: property tests for every registered pacing, hand-computed values per formula."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcore.errors import PluginError
from kdcore.plugins import get_registry

PACINGS = get_registry().names("pacing")
BUILTIN = {"none", "linear", "root", "exponential", "step", "geometric", "points"}

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def create(name: str, **params):
    return get_registry().create("pacing", name, params)


def start_share(name: str, pacing) -> float | None:
    """The share each built-in is documented to start at; None for a pacing we do not know."""
    p = pacing.params
    if name == "none":
        return 1.0
    if hasattr(p, "s0"):
        return 1.0 if name == "exponential" and p.s0 >= 1 else p.s0
    if name == "step":
        return 1.0 / p.k
    if name == "points":
        first = [share for x, share in p.points if x <= 0]
        return first[-1] if first else p.points[0][1]
    return None


def check_properties(name: str, pacing, total: int, steps: list[int]) -> None:
    """Monotone, in (0, 1], starts at its documented share, 1 at the end (and after)."""
    values = [pacing.fraction(s, total) for s in steps]
    for s, v in zip(steps, values, strict=True):
        assert isinstance(v, float), (name, s, v)
        assert 0.0 < v <= 1.0, (name, pacing.params, total, s, v)
    for i in range(1, len(steps)):
        (s1, v1), (s2, v2) = (steps[i - 1], values[i - 1]), (steps[i], values[i])
        assert v1 <= v2, f"{name} {pacing.params} decreases: f({s1})={v1} > f({s2})={v2} of {total}"
    assert pacing.fraction(total, total) == 1.0, (name, pacing.params, total)
    assert pacing.fraction(total + 7, total) == 1.0
    expected = start_share(name, pacing)
    if expected is not None:
        assert pacing.fraction(0, total) == expected, (name, pacing.params, total)


def all_steps(total: int, data) -> list[int]:
    """Every step for short runs; a sorted sample plus the ends for long ones."""
    if total <= 300:
        return list(range(total + 3))
    sample = data.draw(st.lists(st.integers(0, total + 2), min_size=1, max_size=200))
    return sorted({0, 1, total - 1, total, *sample})


def test_builtins_are_registered():
    assert set(PACINGS) >= BUILTIN


@pytest.mark.parametrize("name", PACINGS)
@FAST
@given(total=st.integers(1, 10**7), data=st.data())
def test_every_registered_pacing_with_defaults(name, total, data):
    pacing = create(name)
    check_properties(name, pacing, total, all_steps(total, data))


@pytest.mark.parametrize("name", PACINGS)
def test_every_pacing_has_summary_and_rejects_unknown_params(name):
    entry = get_registry().entry("pacing", name)
    assert entry.description and "\n" not in entry.description
    with pytest.raises(PluginError, match="bogus"):
        create(name, bogus=1)


@pytest.mark.parametrize("name", PACINGS)
def test_degenerate_totals_open_everything(name):
    pacing = create(name)
    assert pacing.fraction(0, 0) == 1.0
    assert pacing.fraction(5, 0) == 1.0


# --- property tests over each built-in's parameters ------------------------------------------

share = st.floats(0, 1, exclude_min=True)
ramp_params = st.fixed_dictionaries({"s0": share, "ramp": share})


@st.composite
def points_params(draw):
    unit = draw(st.sampled_from(["progress", "step"]))
    top = 1.0 if unit == "progress" else 5000.0
    n = draw(st.integers(1, 6))
    xs = sorted(draw(st.lists(st.floats(0, top), min_size=n, max_size=n)))
    shares = [*sorted(draw(st.lists(share, min_size=n - 1, max_size=n - 1))), 1.0]
    return {"points": list(zip(xs, shares, strict=True)), "unit": unit}


PARAM_STRATEGIES = {
    "linear": ramp_params,
    "root": ramp_params,
    "geometric": ramp_params,
    "exponential": st.fixed_dictionaries(
        {
            "s0": share,
            "ramp": share,
            "growth": st.floats(1, 1000, exclude_min=True),
            "step_length": st.none() | st.integers(1, 10**6),
        }
    ),
    "step": st.fixed_dictionaries({"k": st.integers(1, 10_000), "ramp": share}),
    "points": points_params(),
}


@pytest.mark.parametrize("name", sorted(PARAM_STRATEGIES))
@FAST
@given(total=st.integers(1, 10**6), data=st.data())
def test_builtin_properties_over_params(name, total, data):
    params = data.draw(PARAM_STRATEGIES[name])
    pacing = create(name, **params)
    check_properties(name, pacing, total, all_steps(total, data))


# --- hand-computed values ---------------------------------------------------------------------


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("name", "params", "total", "expected"),
    [
        # s0 + (1 − s0)·min(1, t/0.8)
        ("linear", {}, 100, {0: 0.2, 20: 0.4, 40: 0.6, 79: 0.99, 80: 1.0, 100: 1.0}),
        ("linear", {"s0": 0.5, "ramp": 1.0}, 10, {0: 0.5, 5: 0.75, 9: 0.95, 10: 1.0}),
        # sqrt(s0² + (1 − s0²)·p): p=0.5 -> sqrt(0.04 + 0.48) = sqrt(0.52)
        ("root", {}, 100, {0: 0.2, 40: math.sqrt(0.52), 20: math.sqrt(0.28), 80: 1.0}),
        ("root", {"s0": 0.6, "ramp": 1.0}, 4, {0: 0.6, 2: math.sqrt(0.36 + 0.32), 4: 1.0}),
        # s0^(1 − p)
        ("geometric", {}, 100, {0: 0.2, 20: 0.2**0.75, 40: 0.2**0.5, 80: 1.0}),
        ("geometric", {"s0": 0.25, "ramp": 1.0}, 2, {0: 0.25, 1: 0.5, 2: 1.0}),
        # n = ceil(log2 5) = 3 stages of 80/3 steps: 0.2, 0.4, 0.8, then 1 at step 80
        (
            "exponential",
            {},
            100,
            {0: 0.2, 26: 0.2, 27: 0.4, 53: 0.4, 54: 0.8, 79: 0.8, 80: 1.0},
        ),
        # s0=0.25, growth 2: n = 2 stages of 40 steps; the boundary on a whole step opens at it
        ("exponential", {"s0": 0.25}, 100, {39: 0.25, 40: 0.5, 79: 0.5, 80: 1.0}),
        # explicit step_length: 0.1·2^⌊step/10⌋; n = ceil(log2 10) = 4 stages
        (
            "exponential",
            {"s0": 0.1, "step_length": 10, "ramp": 1.0},
            1000,
            {0: 0.1, 9: 0.1, 10: 0.2, 25: 0.4, 39: 0.8, 40: 1.0},
        ),
        ("exponential", {"s0": 0.1, "growth": 10, "step_length": 5, "ramp": 1}, 100, {5: 1.0}),
        # a step_length too long for the run: the ramp still opens everything
        ("exponential", {"step_length": 1000, "ramp": 0.5}, 100, {0: 0.2, 49: 0.2, 50: 1.0}),
        # k=4 buckets over 0.8 of training: opening at t = 0, 0.2, 0.4, 0.6
        ("step", {}, 100, {0: 0.25, 19: 0.25, 20: 0.5, 39: 0.5, 40: 0.75, 59: 0.75, 60: 1.0}),
        ("step", {"k": 3, "ramp": 1.0}, 30, {0: 1 / 3, 9: 1 / 3, 10: 2 / 3, 19: 2 / 3, 20: 1.0}),
        ("step", {"k": 1}, 10, {0: 1.0}),
        # (0, 0.1) → (0.5, 0.5), jump to 0.7 at 0.5, → (0.9, 1.0)
        (
            "points",
            {"points": [(0, 0.1), (0.5, 0.5), (0.5, 0.7), (0.9, 1.0)]},
            100,
            {0: 0.1, 25: 0.3, 49: 0.1 + 0.4 * 0.98, 50: 0.7, 70: 0.85, 90: 1.0, 95: 1.0},
        ),
        ("points", {"points": [(0.2, 0.4), (0.6, 1.0)]}, 10, {0: 0.4, 2: 0.4, 4: 0.7, 6: 1.0}),
        (
            "points",
            {"points": [(10, 0.5), (20, 1.0)], "unit": "step"},
            100,
            {0: 0.5, 10: 0.5, 15: 0.75, 20: 1.0, 99: 1.0},
        ),
        # a step schedule longer than the run: everything opens at total_steps anyway
        ("points", {"points": [(0, 0.5), (500, 1.0)], "unit": "step"}, 100, {99: 0.599, 100: 1.0}),
        ("points", {}, 100, {0: 0.2, 40: 0.6, 80: 1.0}),
        ("none", {}, 100, {0: 1.0, 50: 1.0}),
    ],
)
def test_hand_computed(name, params, total, expected):
    pacing = create(name, **params)
    for step, value in expected.items():
        got = pacing.fraction(step, total)
        assert close(got, value), f"{name}{params}: f({step}/{total}) = {got}, expected {value}"


def test_exponential_default_step_length_rule():
    pacing = create("exponential", s0=0.01, growth=3.0, ramp=0.5)
    assert pacing.stages() == 5  # 3^4 = 81 < 100 ≤ 243 = 3^5
    # each stage lasts 0.5·1000/5 = 100 steps
    assert [pacing.fraction(s, 1000) for s in (0, 99, 100, 200, 300, 400, 499, 500)] == pytest.approx(
        [0.01, 0.01, 0.03, 0.09, 0.27, 0.81, 0.81, 1.0]
    )
    assert create("exponential", s0=1.0).fraction(0, 10) == 1.0


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field", "message"),
    [
        ("linear", {"s0": 0}, "s0", "greater than 0"),
        ("root", {"ramp": 1.5}, "ramp", "less than or equal to 1"),
        ("exponential", {"growth": 1}, "growth", "greater than 1"),
        ("exponential", {"step_length": 0}, "step_length", "greater than or equal to 1"),
        ("step", {"k": 0}, "k", "greater than or equal to 1"),
        ("points", {"points": [(0.5, 0.2), (0.1, 1.0)]}, "points", "sorted ascending"),
        ("points", {"points": [(0, 0.2), (1, 0.9)]}, "points", "last share must be 1"),
        ("points", {"points": [(0, 0.0), (1, 1.0)]}, "points", r"share must be in \(0, 1\]"),
        ("points", {"points": [(0, 0.8), (0.5, 0.3), (1, 1)]}, "points", "must not decrease"),
        ("points", {"points": [(0, 0.5), (2, 1.0)]}, "points", "unit: step"),
        ("points", {"points": [(-1, 0.5), (1, 1.0)]}, "points", "≥ 0"),
        ("points", {"points": []}, "points", "at least 1"),
        ("points", {"unit": "epoch"}, "unit", "progress"),
    ],
)
def test_validation_errors_name_the_field(name, params, field, message):
    with pytest.raises(PluginError, match=message) as info:
        create(name, **params)
    assert field in str(info.value)
    assert f"pacing '{name}'" in str(info.value)


def test_pacing_module_does_not_import_torch():
    code = (
        "import sys, kd_builtin.pacing as m; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(len(m.__doc__))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
