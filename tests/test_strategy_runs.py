"""Every built-in scorer x pacing x reliance trains; the snapshot scorer is free; scorers find hard samples."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_STUDENT, TINY_TEACHER, tiny_overrides

from kdcore.config import StrategyConfig, resolve_config
from kdcore.inputs.corpus import load_corpus
from kdcore.inputs.models import build_from_spec, parse_spec
from kdcore.inputs.tokenization import build_tokenizer
from kdcore.plugins import get_registry
from kdcore.runs.runner import run
from kdcore.training.engine import Trainer, make_strategies
from kdcore.training.loss_path import LossPath

REGISTRY = get_registry()
BUILTIN = {
    kind: [
        e.name for e in REGISTRY.entries if e.kind == kind and e.distribution == "kdcore" and e.status == "ok"
    ]
    for kind in ("scorer", "pacing", "reliance")
}


@pytest.fixture(scope="module")
def setting():
    """Tiny data and a teacher trained for a few dozen steps (about a second)."""
    torch.set_num_threads(1)
    cfg = resolve_config(
        None, tiny_overrides("unused", **{"training.max_steps": 60, "training.batch_size": 16})
    )
    tokenizer = build_tokenizer("byte")
    train, eval_set = load_corpus(cfg.data, 0).pack(tokenizer, cfg.data.seq_len)
    teacher = build_from_spec(parse_spec(TINY_TEACHER), tokenizer, 0)
    strategies, _ = make_strategies(StrategyConfig(reliance="none"))
    trainer = Trainer(teacher, None, train, eval_set, strategies, cfg.training, 1.0)
    trainer.fit()
    return {
        "tokenizer": tokenizer,
        "train": train,
        "eval": eval_set,
        "teacher": trainer.full_student()[0],
        "training": cfg.training.model_copy(update={"max_steps": 3, "batch_size": 8, "eval_every": 3}),
    }


def train_briefly(setting, scorer, pacing, reliance, **params):
    strategy = StrategyConfig(
        scorer={"name": scorer, "params": params.get("scorer", {})}, pacing=pacing, reliance=reliance
    )
    strategies, _ = make_strategies(strategy)
    student = build_from_spec(parse_spec(TINY_STUDENT), setting["tokenizer"], 0)
    trainer = Trainer(
        student, setting["teacher"], setting["train"], setting["eval"], strategies, setting["training"], 2.0
    )
    return trainer, trainer.fit()


@pytest.mark.parametrize("reliance", BUILTIN["reliance"])
@pytest.mark.parametrize("pacing", BUILTIN["pacing"])
@pytest.mark.parametrize("scorer", BUILTIN["scorer"])
def test_every_builtin_combination_trains(setting, scorer, pacing, reliance):
    _trainer, result = train_briefly(setting, scorer, pacing, reliance)
    assert result["steps"] == 3
    assert math.isfinite(result["student_eval_ppl"])
    assert 0.0 <= result["mean_lambda"] <= 1.0
    if reliance == "none":
        assert result["mean_lambda"] == 0.0


def test_student_snapshot_costs_no_extra_forward_pass(setting):
    """The scorer reads statistics the step already computed: forward counts equal the no-scorer run."""

    def forwards(scorer):
        counts = {"n": 0, "ids": []}
        original = LossPath.forward

        def counting_forward(self, rows, sample_ids, *args, **kwargs):
            counts["ids"].append(sample_ids)
            handle = self.student.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
            try:
                return original(self, rows, sample_ids, *args, **kwargs)
            finally:
                handle.remove()

        LossPath.forward = counting_forward
        try:
            trainer, _ = train_briefly(setting, scorer, "root", "threshold")
        finally:
            LossPath.forward = original
        return counts["n"], torch.cat(counts["ids"]).unique(), trainer

    with_none, _, _ = forwards("none")
    with_snapshot, seen, trainer = forwards("student-snapshot")
    assert with_snapshot == with_none == 3  # one student forward per step, nothing else
    known = (~torch.isnan(trainer.strategies.scorer.scores())).nonzero().flatten()
    assert torch.equal(known, seen)  # exactly the samples trained on have a score


def test_teacher_confidence_ranks_hard_demo_levels_above_easy_ones(setting, tmp_path):
    from scipy.stats import spearmanr

    trainer, _ = train_briefly(setting, "teacher-confidence", "none", "fixed")
    scores = trainer.strategies.scorer.scores()
    rho = spearmanr(scores.numpy(), setting["train"].levels.numpy()).statistic
    assert rho > 0.5, rho


@pytest.mark.parametrize(
    ("scorer", "pacing", "reliance"),
    [("student-snapshot", "root", "threshold"), ("teacher-confidence", "linear", "continuous")],
)
def test_a_curriculum_run_records_difficulty_lambda_and_spearman(tmp_path, scorer, pacing, reliance):
    overrides = tiny_overrides(
        tmp_path / "run",
        **{
            "strategy.scorer.name": scorer,
            "strategy.pacing.name": pacing,
            "strategy.reliance.name": reliance,
            "training.max_steps": 24,
            "training.eval_every": 12,
        },
    )
    result = run(resolve_config(None, overrides), show_progress=False)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["strategy"]["scorer"] == scorer
    assert summary["strategy_params"]["reliance"]  # parameters are recorded, defaults included
    assert -1.0 <= summary["difficulty_spearman"] <= 1.0
    assert 0 < summary["mean_lambda"] < 1
    history = pq.read_table(result.run_dir / "difficulty.parquet").to_pandas()
    n = len(load_corpus(resolve_config(None, overrides).data, 0).train_texts)
    assert set(history.columns) == {"sample_id", "step", "score", "rank", "lambda"}
    assert len(history) == n * history["step"].nunique()
    assert history["step"].nunique() >= 2  # re-sorted at each epoch (160 samples / 8 per step = 20 steps)
    assert history["lambda"].between(0, 1).all()
    assert (result.run_dir / "difficulty.png").is_file()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [r["open_share"] for r in records if "open_share" in r]
    assert shares == sorted(shares) and shares[0] < 1.0


def test_spearman_of_constant_scores_is_none_without_a_warning():
    import warnings
    from types import SimpleNamespace

    from scipy.stats import spearmanr

    from kdcore.runs.runner import difficulty_spearman

    levels = torch.tensor([0, 1, 2, 0, 1, 2])
    train = SimpleNamespace(levels=levels)

    def scorer(values):
        return SimpleNamespace(scores=lambda: torch.tensor(values, dtype=torch.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning must not reach the user
        assert difficulty_spearman(scorer([0.5] * 6), train) is None
        assert difficulty_spearman(scorer([0.5, float("nan"), 0.5, 0.5, 0.5, 0.5]), train) is None
        assert difficulty_spearman(scorer([1, 2, 3, 4, 5, 6]), SimpleNamespace(levels=torch.ones(6))) is None
        values = [0.1, 0.5, 0.9, 0.2, 0.4, 0.8]
        expected = spearmanr(values, levels.numpy()).statistic
        assert difficulty_spearman(scorer(values), train) == pytest.approx(expected)
