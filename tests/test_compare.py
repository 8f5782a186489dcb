"""kd compare: arm grammar, validation before anything runs, the table's arithmetic, failures, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from kdcore import compare as cmp
from kdcore.errors import KdError
from tests.conftest import run_kd, tiny_overrides

# --------------------------------------------------------------------------------------------
# the arm grammar
# --------------------------------------------------------------------------------------------


def test_parse_arm_kinds_params_and_dotted_fields():
    name, patch = cmp.parse_arm(
        "sr=scorer:student-snapshot(ema=0.5),pacing:root,reliance:threshold(quantile=0.7,lambda_hard=1.0)"
    )
    assert name == "sr"
    assert patch == {
        "scorer": {"name": "student-snapshot", "params": {"ema": 0.5}},
        "pacing": {"name": "root", "params": {}},
        "reliance": {"name": "threshold", "params": {"quantile": 0.7, "lambda_hard": 1.0}},
    }
    _, patch = cmp.parse_arm("x=reliance:threshold,reliance.params.quantile=0.7,temperature=4,reverse=true")
    assert patch["reliance"] == {"name": "threshold", "params": {"quantile": 0.7}}
    assert patch["temperature"] == 4 and patch["reverse"] is True
    _, patch = cmp.parse_arm("st=reliance:staged(lambdas=[0.5,0.9],temperatures=null)")
    assert patch["reliance"]["params"] == {"lambdas": [0.5, 0.9], "temperatures": None}


def test_apply_patch_replaces_a_new_strategy_and_merges_the_same_one():
    base = {
        "reliance": {"name": "fixed", "params": {"value": 0.3}},
        "temperature": 1.0,
    }  # the default: left out below
    assert cmp.apply_patch(base, {"reliance": {"name": "threshold", "params": {}}})["reliance"] == {
        "name": "threshold",
        "params": {},
    }
    merged = cmp.apply_patch(base, {"reliance": {"name": "fixed", "params": {}}})
    assert merged["reliance"]["params"] == {"value": 0.3}
    assert cmp.format_strategy(cmp.apply_patch(base, cmp.parse_arm("a=pacing:root")[1])) == (
        "pacing:root,reliance:fixed(value=0.3)"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kd", "must be NAME=SPEC"),
        ("kd=", "the strategy is empty"),
        ("a=pacing", "neither KIND:NAME nor FIELD=VALUE"),
        ("a=scorr:random", "'scorr' in 'scorr:random' is not a strategy kind"),
        ("a=training.lr=0.1", "arms differ only in strategy"),
        ("a=reliance:threshold(quantile=0.7", "unbalanced"),
        ("a=reliance:fixed,reliance:threshold", "reliance is chosen twice"),
        ("a@b=reliance:fixed", "'@' is kept for the baselines"),
        ("a=reliance.quantile=0.7", "should be reliance.params.KEY=VALUE"),
    ],
)
def test_arm_spec_errors_are_one_sentence(text, fragment):
    with pytest.raises(KdError) as info:
        cmp.parse_arm(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def _plan(tmp_path: Path, arms: list[str], *, give_share: bool = True, **kwargs) -> cmp.Plan:
    overrides = tiny_overrides(tmp_path / "unused")
    overrides.pop("output.dir")
    if not give_share:  # leave data.train_share to the preset or the dataset's default
        overrides.pop("data.train_share")
    overrides["training.threads"] = 1  # the CI box is shared: one thread per run is the fast choice
    return cmp.build_plan(arm_texts=arms, overrides=overrides, **kwargs)


def test_plan_adds_references_sweep_and_says_so(tmp_path):
    plan = _plan(tmp_path, ["sr=scorer:random,reliance:threshold"], seeds="0,1")
    names = [a.name for a in plan.arms]
    assert names == ["ce", "kd", "sr", "kd@0.1", "kd@0.9"]  # kd (λ=0.5) is the sweep's 0.5 point
    assert plan.ce.auto and plan.kd.auto
    assert any("added arm 'ce'" in n for n in plan.notes)
    assert any("kd@matched-sr" in n for n in plan.notes)
    assert [a.name for a in plan.reliance_arms()] == ["sr"]
    preset = _plan(tmp_path, [], preset="seed-paper", sweep="none")
    assert [a.name for a in preset.arms] == ["ce", "kd", "kd-cl", "kd-cl-sr", "kd-cl-sr-teacher"]
    assert preset.arm("kd-cl-sr-teacher").strategy["scorer"]["name"] == "teacher-confidence"
    assert not any(a.auto for a in preset.arms)


def test_the_multi_epoch_preset_adds_an_inverted_control_and_its_regime(tmp_path):
    from kdcore.compare.arms import MULTI_EPOCH_REGIME

    plan = _plan(tmp_path, [], preset="seed-paper-multi-epoch", sweep="none", give_share=False)
    names = ["ce", "kd", "kd-cl", "kd-cl-sr", "kd-cl-sr-teacher", "kd-cl-sr-inverted"]
    assert [a.name for a in plan.arms] == names
    inverted, sr = plan.arm("kd-cl-sr-inverted").strategy, plan.arm("kd-cl-sr").strategy
    assert inverted["reliance"] == {"name": "threshold", "params": {"invert": True}}
    assert {k: v for k, v in inverted.items() if k != "reliance"} == {
        k: v for k, v in sr.items() if k != "reliance"
    }
    # every arm that varies λ gets its matched-λ baseline, the control too
    assert [a.name for a in plan.reliance_arms()] == ["kd-cl-sr", "kd-cl-sr-teacher", "kd-cl-sr-inverted"]
    # the regime's values are the base config's defaults: the options given (here max_steps 12) win
    assert MULTI_EPOCH_REGIME == {
        "data.train_share": 0.05,
        "training.max_steps": 800,
        "strategy.temperature": 1.0,
    }
    assert plan.base["data"]["train_share"] == 0.05 and plan.base["strategy"]["temperature"] == 1.0
    assert plan.base["training"]["max_steps"] == 12
    assert all(a.strategy["temperature"] == 1.0 for a in plan.arms)
    assert any(n.startswith("preset 'seed-paper-multi-epoch' sets data.train_share=0.05") for n in plan.notes)
    plain = cmp.build_plan(preset="seed-paper-multi-epoch", sweep="none", overrides={"data.train_share": 0.2})
    assert plain.base["training"]["max_steps"] == 800 and plain.base["data"]["train_share"] == 0.2


def test_yaml_arms_and_base_config(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "training": {"max_steps": 7},
                "seeds": [3, 4],
                "arms": {
                    "kd": {"strategy": {"reliance": "fixed"}},
                    "sr": {"strategy": {"reliance": {"name": "threshold", "params": {"quantile": 0.7}}}},
                    "short": "pacing:root,reliance:fixed",
                },
            }
        )
    )
    plan = cmp.build_plan(config=path, sweep="none")
    assert plan.seeds == [3, 4] and plan.base["training"]["max_steps"] == 7
    assert plan.arm("sr").strategy["reliance"] == {"name": "threshold", "params": {"quantile": 0.7}}
    assert plan.arm("short").strategy["pacing"]["name"] == "root"
    path.write_text(
        yaml.safe_dump({"arms": {"x": {"strategy": {"reliance": "fixed"}, "training": {"lr": 1}}}})
    )
    with pytest.raises(KdError, match="only 'strategy' may differ between arms"):
        cmp.build_plan(config=path)


def test_a_train_share_is_part_of_the_base_config(tmp_path):
    from typer.testing import CliRunner

    from kdcore.cli import app

    plan = _plan(tmp_path, ["kd=reliance:fixed"], sweep="none")
    assert plan.base["data"]["train_share"] == 1.0  # tiny_overrides gives the whole demo corpus
    overrides = {**tiny_overrides(tmp_path / "unused"), "data.train_share": 0.05}
    overrides.pop("output.dir")
    plan = cmp.build_plan(arm_texts=["kd=reliance:fixed"], overrides=overrides, sweep="none")
    assert plan.base["data"]["train_share"] == 0.05
    cfg = cmp.plan.arm_config(plan, plan.arm("ce"), 0, tmp_path / "run")
    assert cfg.data.train_share == 0.05 and cfg.output.baseline is False
    # --train-share is kd compare's own option for that field: a bad value fails before anything runs
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "--arm",
            "kd=reliance:fixed",
            "--train-share",
            "1.5",
            "--output-dir",
            str(tmp_path / "c"),
        ],
    )
    assert result.exit_code == 2
    assert (
        "base config: invalid config: data.train_share: Input should be less than or equal to 1"
        in " ".join(result.output.split())
    )
    assert not (tmp_path / "c").exists()


def test_unknown_strategy_fails_before_anything_runs(tmp_path):
    with pytest.raises(KdError) as info:
        _plan(tmp_path, ["kd=reliance:fixed", "typo=scorer:student-snapshott"])
    assert str(info.value).startswith("arm 'typo':")
    assert "student-snapshot" in str(info.value)  # the registry's did-you-mean
    with pytest.raises(KdError, match=r"arm 'bad':.*quantile"):
        _plan(tmp_path, ["bad=reliance:threshold(quantile=2)"])


def test_cli_reports_a_bad_arm_in_one_line_and_runs_nothing(tmp_path):
    result = run_kd("compare", "--arm", "x=scorer:nope", "--output-dir", str(tmp_path / "c"))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: arm 'x':")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# a real (tiny) comparison: 2 arms x 2 seeds, plus the CE reference and the matched-λ baseline
# --------------------------------------------------------------------------------------------
ARMS = ["kd=reliance:fixed", "sr=scorer:random,reliance:threshold(quantile=0.7)"]


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    plan = _plan(root, ARMS, seeds="0,1", sweep="none")
    lines: list[str] = []
    data = cmp.compare(plan, root / "cmp", log=lines.append)
    return root / "cmp", data, lines


def _summaries(out: Path) -> dict[str, dict[int, dict]]:
    found: dict[str, dict[int, dict]] = {}
    for path in (out / "runs").glob("*/seed-*/summary.json"):
        seed = int(path.parent.name.split("-")[1])
        found.setdefault(path.parent.parent.name, {})[seed] = json.loads(path.read_text())
    return found


def test_comparison_layout_and_one_teacher(tiny_comparison):
    out, data, lines = tiny_comparison
    assert {p.name for p in out.iterdir()} >= {
        "compare.yaml",
        "comparison.json",
        "comparison.md",
        "ppl.png",
        "curves.png",
        "runs",
    }
    runs = _summaries(out)
    assert set(runs) == {"ce", "kd", "sr", "kd@matched-sr"}
    assert all(set(by_seed) == {0, 1} for by_seed in runs.values())
    # every arm and seed used the same teacher directory, and the seeds differ
    teachers = set()
    for arm, by_seed in runs.items():
        for seed in by_seed:
            cfg = yaml.safe_load((out / "runs" / arm / f"seed-{seed}" / "config.yaml").read_text())
            teachers.add(cfg["model"]["teacher"])
            assert cfg["training"]["seed"] == seed
            assert cfg["training"]["max_steps"] == 12 and cfg["training"]["batch_size"] == 8
    assert teachers == {data["teacher"]["dir"]}
    assert len(lines) >= 8
    assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(data))


def test_table_arithmetic_matches_the_run_summaries(tiny_comparison):
    out, data, _ = tiny_comparison
    runs = _summaries(out)
    rows = {r["name"]: r for r in data["arms"]}

    def ppl(arm):
        return np.array([runs[arm][s]["student_eval_ppl"] for s in (0, 1)])

    teacher = np.mean([s["teacher_eval_ppl"] for by_seed in runs.values() for s in by_seed.values()])
    ce = ppl("ce").mean()
    for arm in runs:
        values = ppl(arm)
        assert rows[arm]["ppl_mean"] == pytest.approx(values.mean())
        assert rows[arm]["ppl_sd"] == pytest.approx(values.std(ddof=1))
        if arm != "ce":
            assert rows[arm]["gap_closed"] == pytest.approx((ce - values.mean()) / (ce - teacher))
    assert data["teacher"]["eval_ppl"] == pytest.approx(teacher)

    for arm, key, ref in (("sr", "kd", "kd"), ("sr", "matched", "kd@matched-sr"), ("ce", "kd", "kd")):
        diff = ppl(arm) - ppl(ref)
        p = rows[arm]["vs"][key]
        assert p["reference"] == ref and p["n"] == 2
        assert p["mean_diff"] == pytest.approx(diff.mean())
        if diff.std(ddof=1) > 0:
            half = stats.t.ppf(0.975, 1) * diff.std(ddof=1) / math.sqrt(2)
            assert p["ci_low"] == pytest.approx(diff.mean() - half)
            assert p["ci_high"] == pytest.approx(diff.mean() + half)
            expected_p = stats.ttest_rel(ppl(arm), ppl(ref)).pvalue
            assert p["p_value"] == pytest.approx(expected_p)
            assert p["verdict"] == ("significant" if expected_p < 0.05 else "not significant")

    # the matched baseline is vanilla KD at the λ the reliance arm actually used, per seed
    for seed in (0, 1):
        cfg = yaml.safe_load((out / "runs" / "kd@matched-sr" / f"seed-{seed}" / "config.yaml").read_text())
        assert cfg["strategy"]["reliance"]["name"] == "fixed"
        assert cfg["strategy"]["reliance"]["params"]["value"] == pytest.approx(
            runs["sr"][seed]["mean_lambda"], abs=1e-4
        )
        assert runs["kd@matched-sr"][seed]["mean_lambda"] == pytest.approx(
            runs["sr"][seed]["mean_lambda"], abs=1e-4
        )
    md = (out / "comparison.md").read_text()
    assert f"{rows['sr']['ppl_mean']:.3f} ± {rows['sr']['ppl_sd']:.3f}" in md
    assert "matched-λ baseline of sr" in md and "added arm 'ce'" in md
    assert rows["sr"]["vs"]["kd"]["verdict"] in md


def test_stats_with_one_seed_say_na():
    p = cmp.paired_difference({0: 5.0}, {0: 4.0}, "kd")
    assert p.mean_diff == 1.0 and p.p_value is None and p.verdict().startswith("n/a")
    p = cmp.paired_difference({0: 5.0, 1: 6.0, 2: 5.5}, {0: 5.1, 1: 5.9, 2: 5.6}, "kd")
    assert p.verdict() == ("significant" if p.p_value < 0.05 else "not significant")
    assert "not significant" in cmp.format_paired(p.as_json())


def test_resume_skips_finished_runs_and_redoes_partial_ones(tiny_comparison, monkeypatch):
    out, _, _ = tiny_comparison
    copy = out.parent / "resumed"
    shutil.copytree(out, copy)
    (copy / "runs" / "sr" / "seed-1" / "summary.json").unlink()  # a run killed before it finished
    shutil.rmtree(copy / "runs" / "kd@matched-sr" / "seed-1")
    from kdcore.runs import runner

    calls = []
    real_run = runner.run

    def counting(cfg, **kwargs):
        calls.append(str(cfg.output.dir))
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(runner, "run", counting)
    lines: list[str] = []
    data = cmp.resume(copy, log=lines.append)
    assert "sr seed 1: a partial run, continuing it from its last checkpoint" in lines
    assert sum("finished before, reused" in line for line in lines) == 6
    assert sorted(Path(c).relative_to(copy).as_posix() for c in calls) == [
        "runs/kd@matched-sr/seed-1",
        "runs/sr/seed-1",
    ]
    assert all(r["status"] == "ok" for r in data["arms"])
    with pytest.raises(KdError, match="already holds a comparison"):
        cmp.compare(cmp.Plan.load(copy / "compare.yaml"), copy)


def test_a_failed_run_is_reported_and_does_not_lose_the_others(tmp_path, monkeypatch):
    from kdcore.runs import runner

    real_run = runner.run

    def flaky(cfg, **kwargs):
        if cfg.strategy.reliance.name == "threshold" and cfg.training.seed == 1:
            raise RuntimeError("simulated crash in the middle of training\nsecond line")
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(runner, "run", flaky)
    plan = _plan(tmp_path, ARMS, seeds="0,1", sweep="none")
    data = cmp.compare(plan, tmp_path / "cmp", log=lambda line: None)
    rows = {r["name"]: r for r in data["arms"]}
    assert rows["sr"]["status"] == "partial" and rows["sr"]["n_ok"] == 1
    assert rows["sr"]["error"] == "RuntimeError: simulated crash in the middle of training"
    assert rows["kd@matched-sr"]["runs"][1]["status"] == "skipped"
    assert rows["kd"]["status"] == rows["ce"]["status"] == "ok"
    assert rows["sr"]["vs"]["kd"]["note"] == "n/a: fewer than 2 paired seeds"
    assert "partial: RuntimeError: simulated crash" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Traceback" in (tmp_path / "cmp" / "runs" / "sr" / "seed-1.log").read_text()


@pytest.mark.slow
def test_cli_jobs_runs_arms_in_subprocesses(tmp_path):
    overrides = tiny_overrides(tmp_path / "unused")
    overrides.pop("output.dir")
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "cmp"
    result = run_kd(
        "compare",
        "--arm",
        ARMS[0],
        "--arm",
        ARMS[1],
        *sets,
        "--seeds",
        "0,1",
        "--sweep",
        "none",
        "--jobs",
        "2",
        "--output-dir",
        str(out),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "| **sr** |" in result.stdout
    data = json.loads((out / "comparison.json").read_text())
    assert all(r["status"] == "ok" for r in data["arms"])
    cfg = yaml.safe_load((out / "runs" / "kd" / "seed-0.yaml").read_text())
    assert cfg["training"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    resumed = run_kd("compare", "--resume", str(out), "--seeds", "0")
    assert resumed.returncode == 2 and "only --jobs may be given" in resumed.stderr


def test_one_teacher_cache_serves_every_arm_and_seed(tmp_path):
    text = tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "home"]
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400)))
    overrides = tiny_overrides(tmp_path / "unused", **{"data.dataset": str(text), "training.threads": 1})
    overrides.pop("output.dir")
    arms = ["kd=reliance:fixed", "sr=scorer:teacher-confidence,reliance:threshold"]
    with pytest.raises(KdError, match="demo corpus is generated anew for each seed"):
        cmp.build_plan(
            arm_texts=arms, overrides={**overrides, "data.dataset": "demo"}, seeds="0,1", teacher_cache="auto"
        )
    plan = cmp.build_plan(
        arm_texts=arms, overrides=overrides, seeds="0,1", sweep="none", teacher_cache="auto"
    )
    data = cmp.compare(plan, tmp_path / "cmp", log=lambda line: None)
    assert all(r["status"] == "ok" for r in data["arms"]), [r["error"] for r in data["arms"]]
    cache = (tmp_path / "cmp" / "teacher-cache").resolve()
    assert json.loads((cache / "manifest.json").read_text())["top_k"] == 259  # the whole byte vocabulary
    for path in (tmp_path / "cmp" / "runs").glob("*/seed-*/config.yaml"):
        assert yaml.safe_load(path.read_text())["model"]["teacher_cache"] == str(cache)


def test_table_only_rebuilds_from_finished_runs_and_runs_nothing(tiny_comparison, monkeypatch):
    out, full, _ = tiny_comparison
    copy = out.parent / "table-only"
    shutil.copytree(out, copy)
    (copy / "runs" / "sr" / "seed-1" / "summary.json").unlink()
    from kdcore.runs import runner

    def no_runs(*args, **kwargs):
        raise AssertionError("--table-only must not run anything")

    monkeypatch.setattr(runner, "run", no_runs)
    data = cmp.table_only(copy, log=lambda line: None)
    assert (data["runs_finished"], data["runs_planned"]) == (7, 8)
    rows = {r["name"]: r for r in data["arms"]}
    assert rows["sr"]["status"] == "partial" and rows["sr"]["n_ok"] == 1
    assert rows["kd"]["ppl_mean"] == pytest.approx({r["name"]: r for r in full["arms"]}["kd"]["ppl_mean"])
    # gap closed on the seed both finished: seed 0 only
    ce0 = json.loads((copy / "runs" / "ce" / "seed-0" / "summary.json").read_text())["student_eval_ppl"]
    sr0 = json.loads((copy / "runs" / "sr" / "seed-0" / "summary.json").read_text())["student_eval_ppl"]
    assert rows["sr"]["gap_closed"] == pytest.approx((ce0 - sr0) / (ce0 - data["teacher"]["eval_ppl"]))
    assert "**incomplete**: 7 of 8 runs finished" in (copy / "comparison.md").read_text()
    assert not (copy / "runs" / "sr" / "seed-1" / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# sources: the arm grammar, dataset references, matched baselines on the arm's rows, equal time
# --------------------------------------------------------------------------------------------
def test_source_arms_parse_and_the_references_train_on_the_dataset(tmp_path):
    name, patch = cmp.parse_arm("onp=source:on-policy,reliance:threshold")
    assert name == "onp" and patch["source"] == {"name": "on-policy", "params": {}}
    plan = _plan(
        tmp_path,
        [
            "onf=source:on-policy(max_new_tokens=8),reliance:fixed",
            "mix=source:mixed(fraction=0.5),reliance:fixed",
        ],
        sweep="none",
    )
    assert [a.name for a in plan.arms] == ["ce", "kd", "onf", "mix"]  # neither is taken for vanilla KD
    assert plan.ce.source == plan.kd.source == "dataset"
    assert (
        cmp.format_strategy(plan.arm("onf").strategy) == "reliance:fixed,source:on-policy(max_new_tokens=8)"
    )
    assert cmp.format_strategy(plan.kd.strategy) == "reliance:fixed"  # the default source is left out
    assert plan.timed_arms() == []  # equal steps only, unless asked
    timed = _plan(tmp_path, ["onf=source:on-policy,reliance:fixed"], sweep="none", equal_time=True)
    assert [a.name for a in timed.timed_arms()] == ["onf"]
    assert any("'onf@equal-time'" in note for note in timed.notes)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    with pytest.raises(
        KdError, match=r"^arm 'onf' trains on text written during training \(source 'on-policy'\)"
    ):
        _plan(
            tmp_path,
            ["onf=source:on-policy,reliance:fixed"],
            sweep="none",
            teacher_cache=str(cache),
            seeds="0",
        )
    _plan(
        tmp_path,
        ["m0=source:mixed(fraction=0),reliance:fixed"],
        sweep="none",
        teacher_cache=str(cache),
        seeds="0",
    )


def test_an_on_policy_arm_with_its_matched_baseline_and_its_equal_time_run(tmp_path):
    arm = "onp=source:on-policy(prompt_tokens=8,max_new_tokens=8),reliance:threshold"
    plan = _plan(tmp_path, [arm], seeds="0", sweep="none", equal_time=True)
    data = cmp.compare(plan, tmp_path / "cmp", log=lambda line: None)
    out = tmp_path / "cmp"
    runs = _summaries(out)
    assert set(runs) == {"ce", "kd", "onp", "kd@matched-onp", "onp@equal-time"}

    def config(name):
        return yaml.safe_load((out / "runs" / name / "seed-0" / "config.yaml").read_text())

    # the matched baseline trains on the arm's rows, at a constant λ
    assert config("kd@matched-onp")["strategy"]["source"]["name"] == "on-policy"
    assert config("kd@matched-onp")["strategy"]["reliance"]["name"] == "fixed"
    # the equal-time run: the arm for the steps that fit in kd's training time at the arm's time per step
    kd, onp = runs["kd"][0], runs["onp"][0]
    kd_seconds = kd["train_tokens"] / kd["tokens_per_second"]
    onp_step = onp["train_tokens"] / onp["tokens_per_second"] / onp["steps"]
    steps = max(1, round(kd_seconds / onp_step))
    assert config("onp@equal-time")["training"]["max_steps"] == steps == runs["onp@equal-time"][0]["steps"]
    assert config("onp@equal-time")["strategy"] == config("onp")["strategy"]
    rows = {r["name"]: r for r in data["arms"]}
    assert rows["onp@equal-time"]["role"] == "equal-time" and rows["onp@equal-time"]["vs"]["kd"]["n"] == 1
    assert rows["onp"]["generation_share_mean"] > 0 and rows["kd"]["generation_share_mean"] == 0
    assert rows["onp"]["onpolicy_kl_mean"] == pytest.approx(onp["onpolicy_kl"])
    md = (out / "comparison.md").read_text()
    assert "on-policy KL" in md and f"{onp['onpolicy_kl']:.4f}" in md
    assert f"onp at the kd arm's training time ({steps} steps)" in md
    # --resume reuses every run, the equal-time one included
    again = cmp.resume(out, log=lambda line: None)
    assert again["runs_finished"] == again["runs_planned"] == 5


def test_resume_never_runs_code_from_a_crafted_checkpoint(tiny_comparison, tmp_path):
    """kd compare --resume continues a partial run through kd run's resume; a crafted checkpoint is
    refused there (and the run redone from scratch), never executed."""
    from tests.test_resume import plant_payload

    out, _, _ = tiny_comparison
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    run_dir = copy / "runs" / "sr" / "seed-1"
    (run_dir / "summary.json").unlink()
    checkpoint = run_dir / "checkpoints" / "step-12"
    checkpoint.mkdir(parents=True)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    meta = {"format": 1, "step": 12, "world_size": 1, "metrics_bytes": 0, "config": config, "files": {}}
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    marker = tmp_path / "payload-ran"
    plant_payload(checkpoint, "trainer_state.pt", marker)
    data = cmp.resume(copy, log=lambda line: None)
    assert not marker.exists()
    log = (copy / "runs" / "sr" / "seed-1.log").read_text()
    assert f"checkpoint {checkpoint} is damaged: trainer_state.pt calls exec when loaded" in log
    assert "resume failed; running from scratch" in log
    assert all(r["status"] == "ok" for r in data["arms"])


def test_cli_exits_non_zero_when_an_arm_has_no_finished_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdcore.cli import app
    from kdcore.runs import runner

    real_run = runner.run

    def failing(cfg, **kwargs):
        if cfg.strategy.reliance.name == "threshold":
            raise RuntimeError("simulated crash")
        return real_run(cfg, **kwargs)

    monkeypatch.setattr(runner, "run", failing)
    overrides = tiny_overrides(tmp_path / "unused")
    overrides.pop("output.dir")
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "cmp"
    args = ["compare", "--arm", ARMS[1], *sets, "--seeds", "0", "--sweep", "none", "--no-matched"]
    result = CliRunner().invoke(app, [*args, "--output-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert "| **sr** |" in result.output  # the table is still printed
    assert result.output.strip().splitlines()[-1] == (
        f"error: arm 'sr' has no finished run (RuntimeError: simulated crash); see the logs in "
        f"{out / 'runs' / 'sr'}/, then finish with kd compare --resume {out}"
    )
    table = CliRunner().invoke(app, ["compare", "--resume", str(out), "--table-only"])
    assert table.exit_code == 1 and "error: arm 'sr' has no finished run" in table.output


# --------------------------------------------------------------------------------------------
# every run checked as kd run --dry-run checks it, before anything trains or is written
# --------------------------------------------------------------------------------------------
def _no_training(monkeypatch) -> list:
    """Record any teacher resolution or arm run instead of doing it."""
    from kdcore.compare import execute
    from kdcore.runs import runner

    calls: list = []
    monkeypatch.setattr(runner, "run", lambda cfg, **kw: calls.append(("run", cfg.output.dir)))
    monkeypatch.setattr(execute, "resolve_plan_teacher", lambda *a: calls.append("teacher"))
    return calls


@pytest.mark.parametrize(
    ("arm", "extra", "message"),
    [
        (
            "bad=source:on-policy,reliance:none",
            {},
            r"^arm 'bad': source 'on-policy' trains on the teacher term alone and reliance 'none' sets "
            r"every λ to 0",
        ),
        (
            "long=source:on-policy(max_new_tokens=40),reliance:fixed",
            {"model.student": "gpt2:n_layer=1,n_embd=16,n_head=2,n_positions=64"},
            r"^arm 'long': source 'on-policy': a prompt of 32 tokens and max_new_tokens 40 exceed the "
            r"models' 64 positions; lower max_new_tokens or prompt_tokens$",
        ),
    ],
)
def test_an_arm_its_run_would_refuse_fails_before_anything_trains(tmp_path, monkeypatch, arm, extra, message):
    overrides = {**tiny_overrides(tmp_path / "unused"), **extra}
    overrides.pop("output.dir")
    plan = cmp.build_plan(arm_texts=["kd=reliance:fixed", arm], overrides=overrides, sweep="none", seeds="0")
    calls = _no_training(monkeypatch)
    out = tmp_path / "cmp"
    with pytest.raises(KdError, match=message):
        cmp.compare(plan, out, log=lambda line: None)
    assert calls == [] and not out.exists()
    # a comparison written before this check existed: --resume refuses the same way, runs nothing
    out.mkdir()
    (out / "compare.yaml").write_text(plan.to_yaml())
    with pytest.raises(KdError, match=message):
        cmp.resume(out, log=lambda line: None)
    assert calls == [] and [p.name for p in out.iterdir()] == ["compare.yaml"]


def test_a_base_config_that_runs_would_refuse_fails_in_one_line_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from kdcore.cli import app

    overrides = tiny_overrides(tmp_path / "unused")
    overrides.pop("output.dir")
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    out = tmp_path / "cmp"
    args = ["compare", "--arm", "kd=reliance:fixed", *sets, "--seeds", "0", "--sweep", "none"]
    missing = str(tmp_path / "missing.txt")
    for extra, message in (
        (["--dataset", missing], f"error: dataset '{missing}' not found; pass a local"),
        (["--set", "training.batch_size=1000"], "error: training.batch_size 1000 is larger than the 1"),
    ):
        result = CliRunner().invoke(app, [*args, *extra, "--output-dir", str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith(message), result.output
        assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_refusal_before_the_first_arm_trains_leaves_nothing(tmp_path, monkeypatch, existed):
    from kdcore.compare import execute

    def refuse(*args):
        raise KdError("the teacher could not be trained")

    monkeypatch.setattr(execute, "resolve_plan_teacher", refuse)
    plan = _plan(tmp_path, ["kd=reliance:fixed"], sweep="none", seeds="0")
    out = tmp_path / "cmp"
    if existed:
        out.mkdir()
    with pytest.raises(KdError, match="the teacher could not be trained"):
        cmp.compare(plan, out, log=lambda line: None)
    assert (list(out.iterdir()) == []) if existed else not out.exists()


def test_the_matched_row_shows_the_source_it_trains_on(tmp_path):
    """A matched-λ baseline keeps its arm's source (and divergence, temperature); its row said only
    reliance:fixed(value=matched)."""
    arm = "onp=source:on-policy(max_new_tokens=8),reliance:threshold,divergence:reverse-kl"
    plan = _plan(tmp_path, [arm, "sr=reliance:threshold"], sweep="none", seeds="0")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.yaml").write_text(plan.to_yaml())
    rows = {r["name"]: r for r in cmp.table_only(out, log=lambda line: None)["arms"]}
    assert rows["kd@matched-onp"]["strategy"] == (
        "reliance:fixed(value=matched),divergence:reverse-kl,source:on-policy(max_new_tokens=8)"
    )
    assert rows["kd@matched-sr"]["strategy"] == "reliance:fixed(value=matched)"
    assert "`reliance:fixed(value=matched),divergence:reverse-kl,source:on-policy(max_new_tokens=8)`" in (
        (out / "comparison.md").read_text()
    )
