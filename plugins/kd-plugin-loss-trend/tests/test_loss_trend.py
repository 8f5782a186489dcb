"""Tests for the loss-trend scorer: hand-computed numbers, resume, registration, and a tiny `kd run`.

No conftest.py on purpose: kdcore's CI collects these tests together with kdcore's own ``tests/``
(whose ``conftest`` module must stay the only one), so everything this file needs is in it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from kd_loss_trend import LossTrend, kd_register_scorers
from pydantic import ValidationError

from kdcore import DifficultyScorer, KdError, ScorerContext

NAN = float("nan")


def ctx(n: int) -> ScorerContext:
    """A context without models: loss-trend needs only the number of samples."""

    def no_pass() -> dict[str, torch.Tensor]:
        raise AssertionError("loss-trend must not ask for a model pass")

    return ScorerContext(
        num_samples=n,
        lengths=torch.full((n,), 8),
        seq_len=8,
        seed=0,
        teacher_stats=no_pass,
        student_stats=no_pass,
    )


def scorer(n: int = 4, **params) -> LossTrend:
    s = LossTrend(LossTrend.Params(**params))
    s.prepare(ctx(n))
    return s


def see(s: LossTrend, ids: list[int], ce: list[float], tokens: list[float] | None = None) -> None:
    """One micro-batch, with every statistic the engine passes (``ce`` and ``tokens`` matter here)."""
    loss = torch.tensor(ce, dtype=torch.float32)
    stats = {"ce": loss, "kd": torch.zeros_like(loss), "confidence": torch.zeros_like(loss)}
    stats["tokens"] = torch.full_like(loss, 8.0) if tokens is None else torch.tensor(tokens)
    s.observe(torch.tensor(ids, dtype=torch.long), stats)


def expect(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    exp = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(actual, exp, atol=1e-6, equal_nan=True), (actual.tolist(), expected)


# ---------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------


def test_diff_is_latest_minus_first_and_nan_until_seen_twice():
    s = scorer()
    expect(s.scores(), [NAN] * 4)
    see(s, [0, 1], [2.0, 3.0])
    expect(s.scores(), [NAN] * 4)  # seen once: no trend yet
    see(s, [0, 2], [1.5, 4.0])
    expect(s.scores(), [-0.5, NAN, NAN, NAN])  # 1.5 − 2.0
    see(s, [1, 0], [3.5, 0.5])
    expect(s.scores(), [-1.5, 0.5, NAN, NAN])  # 0.5 − 2.0 (reference stays the first); 3.5 − 3.0
    assert s.seen_count.tolist() == [3, 2, 1, 0]


def test_ratio_mode():
    s = scorer(mode="ratio")
    see(s, [0, 1, 2], [2.0, 4.0, 0.0])
    see(s, [0, 1, 2], [1.5, 5.0, 0.0])
    s_ = s.scores()
    expect(s_[:2], [0.75, 1.25])  # 1.5 / 2.0, 5.0 / 4.0
    assert math.isnan(s_[3])
    assert s_[2] == 0.0  # 0 / 0 does not become NaN: the reference is clamped away from zero


def test_early_reference_is_the_mean_of_the_first_sightings():
    s = scorer(early=2)
    see(s, [0], [4.0])
    see(s, [0], [2.0])
    expect(s.scores()[:1], [NAN])  # both sightings are reference
    see(s, [0], [1.0])
    expect(s.scores()[:1], [-2.0])  # 1.0 − mean(4, 2)
    see(s, [0], [5.0])
    expect(s.scores()[:1], [2.0])  # 5.0 − 3.0


def test_repeated_id_in_one_call_equals_sequential_calls():
    together, apart = scorer(early=2), scorer(early=2)
    see(together, [3, 1, 3, 3, 1], [5.0, 1.0, 4.0, 2.0, 0.5])
    for i, v in [(3, 5.0), (1, 1.0), (3, 4.0), (3, 2.0), (1, 0.5)]:
        see(apart, [i], [v])
    expect(together.scores(), [NAN, NAN, NAN, -2.5])  # 2.0 − mean(5, 4); id 1 seen only twice
    assert torch.equal(together.scores().isnan(), apart.scores().isnan())
    assert torch.allclose(together.scores(), apart.scores(), equal_nan=True)
    assert together.state_dict()["seen_count"].tolist() == [0, 2, 0, 3]


def test_non_finite_losses_and_empty_samples_are_ignored():
    s = scorer()
    see(s, [0, 1], [2.0, NAN])
    see(s, [0, 1], [math.inf, 3.0])
    see(s, [0], [1.0])
    see(s, [0, 1], [0.0, 0.0], tokens=[0.0, 0.0])  # no valid token: kdcore reports ce = 0
    expect(s.scores(), [-1.0, NAN, NAN, NAN])
    assert s.seen_count.tolist() == [2, 1, 0, 0]


def test_is_a_difficulty_scorer_that_needs_nothing_extra():
    assert issubclass(LossTrend, DifficultyScorer)
    assert LossTrend.needs == frozenset()
    assert "loss" in LossTrend.summary() and "\n" not in LossTrend.summary()
    with pytest.raises(RuntimeError, match="before prepare"):
        LossTrend().scores()


# ---------------------------------------------------------------------------------------------
# parameters and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"), [({"mode": "log"}, "mode"), ({"early": 0}, "early"), ({"x": 1}, "x")]
)
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(ValidationError, match=field):
        LossTrend.Params.model_validate(params)


def test_state_dict_round_trip_before_prepare_keeps_the_state():
    a = scorer(mode="ratio")
    see(a, [0, 1, 2], [2.0, 4.0, 1.0])
    see(a, [0, 1], [1.0, 4.4])
    state = a.state_dict()
    b = LossTrend(LossTrend.Params(mode="ratio"))
    b.load_state_dict(state)  # the engine restores a checkpoint before prepare()
    b.prepare(ctx(4))  # ... and prepare keeps it
    expect(b.scores(), a.scores().tolist())
    see(a, [2], [0.5])
    see(b, [2], [0.5])
    expect(b.scores(), a.scores().tolist())
    expect(b.scores(), [0.5, 1.1, 0.5, NAN])


def test_state_from_another_dataset_or_parameters_is_refused():
    state = scorer(n=4).state_dict()
    with pytest.raises(KdError, match="covers 4 samples but the dataset has 5"):
        s = LossTrend()
        s.load_state_dict(state)
        s.prepare(ctx(5))
    with pytest.raises(KdError, match="early=1 but this run has early=3"):
        LossTrend(LossTrend.Params(early=3)).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# packaging: the hook, the entry point, and `kd list-plugins`
# ---------------------------------------------------------------------------------------------


def test_hook_registers_the_class_under_its_name():
    seen = []
    kd_register_scorers(register=lambda name, cls: seen.append((name, cls)))
    assert seen == [("loss-trend", LossTrend)]


def kd(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kdcore", *args], capture_output=True, text=True, env=full, timeout=timeout
    )


def test_kd_list_plugins_shows_the_installed_distribution():
    result = kd("list-plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(result.stdout) if r["name"] == "loss-trend"]
    assert [(r["kind"], r["distribution"], r["version"], r["status"]) for r in rows] == [
        ("scorer", "kd-plugin-loss-trend", "0.1.0", "ok")
    ]
    hidden = kd("list-plugins", "--json", env={"KD_DISABLE_PLUGINS": "kd-plugin-loss-trend"})
    assert hidden.returncode == 0
    assert all(r["name"] != "loss-trend" for r in json.loads(hidden.stdout))


def test_bad_parameter_on_the_command_line_is_one_sentence():
    result = kd("run", "--scorer", "loss-trend", "--scorer-arg", "mode=log", "--print-config")
    assert result.returncode == 2
    assert "bad parameters for scorer 'loss-trend': mode:" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# end to end: a tiny `kd run --scorer loss-trend` in a subprocess (about 8 s on one thread)
# ---------------------------------------------------------------------------------------------


def test_tiny_kd_run_uses_the_scorer(tmp_path):
    pd = pytest.importorskip("pandas")
    run_dir = tmp_path / "run"
    # Reuse the cache kdcore's own test session set up, if any; never the user's cache.
    cache = os.environ.get("KD_CACHE_DIR") or str(tmp_path / "cache")
    result = kd(
        "run",
        "--teacher", "gpt2:n_layer=2,n_embd=32,n_head=2",
        "--student", "gpt2:n_layer=1,n_embd=16,n_head=2",
        "--teacher-steps", "40",
        "--seq-len", "48",
        "--set", "data.demo_samples=40",
        "--set", "data.max_eval_samples=16",
        "--max-steps", "12",
        "--batch-size", "8",
        "--eval-every", "12",
        "--threads", "1",
        "--scorer", "loss-trend",
        "--scorer-arg", "mode=ratio",
        "--pacing", "linear",
        "--reliance", "threshold",
        "--output-dir", str(run_dir),
        env={"KD_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    import yaml

    provenance = yaml.safe_load((run_dir / "strategies.yaml").read_text())["scorer"]
    assert provenance == {
        "name": "loss-trend",
        "params": {"mode": "ratio", "early": 1},
        "distribution": "kd-plugin-loss-trend",
        "version": "0.1.0",
    }
    # The curriculum re-sorts at every epoch from scores(): the first time nothing is known (NaN),
    # later the samples seen twice have a loss ratio (positive) and a rank.
    history = pd.read_parquet(run_dir / "difficulty.parquet")
    first, last = history["step"].min(), history["step"].max()
    assert history.loc[history["step"] == first, "score"].isna().all()
    known = history[(history["step"] == last) & history["score"].notna()]
    assert len(known) > 0
    assert (known["score"] > 0).all()
    assert known["rank"].between(0, 1).all()
