"""Experiment trackers through accelerate: TensorBoard for real, wandb offline when installed, missing ones."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from conftest import tiny_overrides
from typer.testing import CliRunner

from kdcore.cli import app
from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.runs import trackers
from kdcore.runs.runner import run


def tiny_run(path, **extra):
    return run(resolve_config(None, tiny_overrides(path, **extra)), show_progress=False)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip(
        "tensorboard", reason='tensorboard is not installed (pip install "kdcore[tensorboard]")'
    )
    return tiny_run(tmp_path_factory.mktemp("tb") / "run", **{"output.report_to": "tensorboard"})


def test_tensorboard_scalars_equal_metrics_jsonl(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tensorboard_run.run_dir
    events = EventAccumulator(str(run_dir / "kdcore"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    records = read_metrics(run_dir)
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(trackers.METRIC_NAMES.get(key, f"train/{key}"), {})[record["step"]] = (
                    value
                )
    for tag in ("train/loss", "train/ce", "train/kd", "train/lambda", "train/open_share", "eval/perplexity"):
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert set(expected) <= set(scalars)
    for tag, by_step in expected.items():
        assert sorted(scalars[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (
                tag,
                step,
            )  # float32 in the event file
    summary = tensorboard_run.summary
    assert scalars["eval/teacher_perplexity"][0] == pytest.approx(summary["teacher_eval_ppl"], rel=1e-6)
    assert scalars["eval/perplexity"][summary["steps"]] == pytest.approx(
        summary["student_eval_ppl"], rel=1e-6
    )


def test_tensorboard_hparams_are_the_resolved_config(tensorboard_run):
    run_dir = tensorboard_run.run_dir
    (hparams_file,) = (run_dir / "kdcore").glob("*/hparams.yml")
    hparams = yaml.safe_load(hparams_file.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert hparams == trackers.flatten_hparams(config)
    assert hparams["training.max_steps"] == 12
    assert hparams["strategy.reliance.name"] == "fixed"
    assert hparams["output.report_to"] == "tensorboard"


def test_flatten_hparams_gives_values_every_tracker_takes():
    flat = trackers.flatten_hparams(
        {"a": {"b": 1, "c": None, "d": [1, 2], "e": {"f": "x"}, "g": {}}, "h": True, "i": 0.5}
    )
    assert flat == {"a.b": 1, "a.c": "null", "a.d": "[1, 2]", "a.e.f": "x", "a.g": "{}", "h": True, "i": 0.5}


def test_tracker_values_map_metric_names():
    values = trackers.tracker_values({"step": 4, "loss": 1.0, "lambda": 0.5, "eval_ppl": 9.0, "new_term": 2})
    assert values == {"train/loss": 1.0, "train/lambda": 0.5, "eval/perplexity": 9.0, "train/new_term": 2.0}


def test_missing_tracker_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(KdError) as info:
        trackers.resolve_trackers("wandb")
    message = str(info.value)
    assert 'pip install "kdcore[wandb]"' in message and "\n" not in message
    assert trackers.resolve_trackers("none") == []


def test_report_to_all_is_every_installed_tracker():
    installed = [name for name in trackers.TRACKERS if trackers.installed(name)]
    if not installed:
        with pytest.raises(KdError, match="kdcore"):
            trackers.resolve_trackers("all")
    else:
        assert trackers.resolve_trackers("all") == installed


def test_cli_missing_tracker_fails_before_training(tmp_path):
    missing = [name for name in ("mlflow", "wandb") if not trackers.installed(name)]
    if not missing:
        pytest.skip("wandb and mlflow are both installed")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--report-to", missing[0], "--output-dir", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: --report-to {missing[0]} needs the {missing[0]} package, which is not installed; "
        f'run pip install "kdcore[{missing[0]}]"'
    ]
    assert not out.exists()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='wandb is not installed (pip install "kdcore[wandb]")')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = tiny_run(tmp_path / "run", **{"output.report_to": "wandb"})
    offline_runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb wrote no offline run in RUN_DIR/wandb"


# -- a resumed run continues the same tracker run -------------------------------------------------------
def interrupted_and_resumed(path, report_to: str):
    """A 12-step run with checkpoints at 8 and 12, cut back to a crash after step 12 but before its
    checkpoint and summary, then resumed from step 8: steps 9-12 are logged a second time."""
    import shutil

    from kdcore.training.checkpoint import resume_config

    first = tiny_run(path, **{"output.report_to": report_to, "training.checkpoint_every": 4})
    run_dir = first.run_dir
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "student")
    shutil.rmtree(run_dir / "checkpoints" / "step-12")
    ids = json.loads((run_dir / trackers.IDS_FILE).read_text()) if report_to != "tensorboard" else {}
    run(resume_config(run_dir), resume=True, show_progress=False)
    return run_dir, ids


def test_a_resumed_run_continues_its_tensorboard_run_without_repeated_steps(tmp_path):
    pytest.importorskip(
        "tensorboard", reason='tensorboard is not installed (pip install "kdcore[tensorboard]")'
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = interrupted_and_resumed(tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(run_dir / "kdcore"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):  # metrics.jsonl: cut back to step 8 on resume, then 9-12 again
        for key, value in trackers.tracker_values(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    for tag, points in expected.items():
        # what TensorBoard shows is one curve: each step once, the values of metrics.jsonl
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        for (_, shown), (_, value) in zip(logged[tag], points, strict=True):
            assert shown == pytest.approx(value, rel=1e-6), tag  # float32 in the event file
    assert [step for step, _ in logged["train/loss"]] == [4, 8, 12]
    assert [step for step, _ in logged["eval/teacher_perplexity"]] == [0]  # logged at the first start only
    assert len(list((run_dir / "kdcore").glob("*/hparams.yml"))) == 1  # one hyper-parameter entry


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='wandb is not installed (pip install "kdcore[wandb]")')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, ids = interrupted_and_resumed(tmp_path / "run", "wandb")
    sessions = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(name.endswith(f"-{ids['wandb']}") for name in sessions)
    assert json.loads((run_dir / trackers.IDS_FILE).read_text()) == ids


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason='mlflow is not installed (pip install "kdcore[mlflow]")')
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _, ids = interrupted_and_resumed(tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdcore").experiment_id])
    assert run.info.run_id == ids["mlflow"]
    # MLflow keeps every point: steps 9-12 twice, with the same values (a resumed run is bit-for-bit)
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss"))
    assert [step for step, _ in history] == [4, 8, 12, 12]
    assert history[2][1] == history[3][1]
