"""kd run --baseline: the CE-only student beside a run, its numbers in the run's summary, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_same_run, tiny_overrides

from kdcore.config import resolve_config
from kdcore.errors import RunInterrupted

#: the summary fields only a run with a baseline fills
BASELINE_FIELDS = {"baseline_eval_ppl", "gap_closed"}


def tiny(run_dir: Path, **extra) -> dict:
    return tiny_overrides(run_dir, **{"training.threads": 1, "training.checkpoint_every": 4, **extra})


def run_in_process(overrides: dict):
    from rich.console import Console

    from kdcore.runs.runner import run

    console = Console(stderr=True, soft_wrap=True, width=400)
    return run(resolve_config(None, overrides), show_progress=False, console=console)


def resume(run_dir: Path):
    """What kd run --resume DIR does, in this process."""
    from rich.console import Console

    from kdcore.runs.runner import run
    from kdcore.training.checkpoint import resume_config

    console = Console(stderr=True, soft_wrap=True, width=400)
    return run(resume_config(run_dir), show_progress=False, resume=True, console=console)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A KD run with --baseline (through the CLI), and plain runs of the same config: KD, and CE only."""
    from rich.console import Console
    from typer.testing import CliRunner

    from kdcore.cli import app

    tmp = tmp_path_factory.mktemp("baseline")
    args = ["run", "--baseline"]
    for key, value in tiny(tmp / "with-baseline").items():
        args += ["--set", f"{key}={value}"]
    with pytest.MonkeyPatch.context() as patch:  # a console wide enough for the table's rows
        patch.setattr("kdcore.cli.run.err", Console(stderr=True, width=200))
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_in_process(tiny(tmp / "kd"))
    run_in_process(tiny(tmp / "ce", **{"strategy.reliance": "none"}))
    return {"dir": tmp, "output": result.output}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_gap_closed_is_computed_from_the_two_perplexities_on_file(runs):
    run_dir = runs["dir"] / "with-baseline"
    main, baseline = summary(run_dir), summary(run_dir / "baseline")
    ce, kd, teacher = baseline["student_eval_ppl"], main["student_eval_ppl"], main["teacher_eval_ppl"]
    assert main["baseline_eval_ppl"] == ce
    assert baseline["teacher_eval_ppl"] == teacher  # the baseline reports the run's teacher evaluation
    assert ce > teacher  # else the gap is undefined and this test would check nothing
    # (JSON keeps every float exactly; the tolerance only covers the order of the operations)
    assert main["gap_closed"] == pytest.approx((ce - kd) / (ce - teacher), rel=1e-12)
    assert baseline["strategy"] == {
        "scorer": "none",
        "pacing": "none",
        "reliance": "none",
        "divergence": "forward-kl",
        "source": "dataset",
    }
    assert baseline["mean_lambda"] == 0.0 and baseline["baseline_eval_ppl"] is None
    # the table shows both perplexities and the share, as summary.json holds them
    out = " ".join(runs["output"].split())
    assert f"CE-only student eval perplexity (baseline) │ {ce:.3f}" in out
    assert f"CE→teacher gap closed │ {main['gap_closed']:.1%}" in out
    assert f"student eval perplexity │ {kd:.3f}" in out


def test_the_baseline_is_a_plain_ce_run_and_leaves_the_run_unchanged(runs):
    tmp = runs["dir"]
    assert_same_run(tmp / "with-baseline" / "baseline", tmp / "ce")
    assert_same_run(tmp / "with-baseline", tmp / "kd", ignore=BASELINE_FIELDS)
    config = json.loads(
        json.dumps(resolve_config(tmp / "with-baseline" / "baseline" / "config.yaml").to_dict())
    )
    assert config["strategy"]["reliance"]["name"] == "none"
    assert config["output"]["baseline"] is False and config["output"]["dir"].endswith(
        "with-baseline/baseline"
    )


def test_a_run_stopped_inside_its_baseline_resumes_both(runs, tmp_path, capsys):
    reference = runs["dir"] / "with-baseline"
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for path in run_dir.iterdir():  # the run itself had not started: only its config and the baseline
        if path.name not in ("config.yaml", "strategies.yaml", "baseline"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    base = run_dir / "baseline"
    for path in (base / "summary.json", base / "student", base / "checkpoints" / "step-12"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    resume(run_dir)
    assert "Baseline: the CE-only student (continued from step 8)" in capsys.readouterr().err
    assert_same_run(base, reference / "baseline")
    assert_same_run(run_dir, reference)


def test_a_run_stopped_after_its_baseline_reuses_it(runs, tmp_path, capsys):
    reference = runs["dir"] / "with-baseline"
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "student")
    shutil.rmtree(run_dir / "checkpoints" / "step-12")
    before = (run_dir / "baseline" / "summary.json").read_bytes()

    resume(run_dir)
    assert "Baseline:" not in capsys.readouterr().err
    assert (run_dir / "baseline" / "summary.json").read_bytes() == before  # read back, not trained again
    assert_same_run(run_dir, reference)


def test_a_stop_inside_the_baseline_names_the_run_to_resume(tmp_path, monkeypatch):
    from kdcore.runs import runner

    def stop(cfg, run_dir, *args, **kwargs):
        raise RunInterrupted(5, 15, run_dir)

    monkeypatch.setattr(runner, "train", stop)
    with pytest.raises(RunInterrupted) as caught:
        run_in_process(tiny(tmp_path / "run", **{"output.baseline": True}))
    assert str(caught.value) == (
        f"stopped the CE-only baseline at step 5; resume with: kd run --resume {tmp_path / 'run'}"
    )
    assert caught.value.exit_code == 143


def test_a_second_ctrl_c_inside_the_baseline_names_the_step_to_resume_from(tmp_path, monkeypatch):
    from kdcore.runs import runner

    def stop(cfg, run_dir, *args, **kwargs):  # no checkpoint at step 7: the newest is step 4
        raise RunInterrupted(7, 2, run_dir, True, resume_step=4)

    monkeypatch.setattr(runner, "train", stop)
    with pytest.raises(RunInterrupted) as caught:
        run_in_process(tiny(tmp_path / "run", **{"output.baseline": True}))
    assert str(caught.value) == (
        "stopped the CE-only baseline at step 7 without a checkpoint; resume from step 4 with: "
        f"kd run --resume {tmp_path / 'run'}"
    )
    assert caught.value.exit_code == 130 and caught.value.resume_step == 4


def test_a_ce_run_has_no_baseline(tmp_path, capsys):
    result = run_in_process(tiny(tmp_path / "run", **{"output.baseline": True, "strategy.reliance": "none"}))
    assert "this run is the CE-only student already" in capsys.readouterr().err
    assert not (tmp_path / "run" / "baseline").exists()
    assert result.summary.baseline_eval_ppl is None and result.summary.gap_closed is None


def test_the_dry_run_says_what_the_baseline_adds(tmp_path):
    from kdcore.runs.dry_run import dry_run

    cfg = resolve_config(None, tiny(tmp_path / "run", **{"output.baseline": True, "model.teacher_steps": 11}))
    report = dry_run(cfg)
    assert (
        "--baseline: the CE-only student is trained too, in RUN_DIR/baseline: 12 more steps, without the teacher"
        in report.notes
    )
    ce = resolve_config(None, tiny(tmp_path / "ce", **{"output.baseline": True, "strategy.reliance": "none"}))
    assert "--baseline: this run is the CE-only student already; no baseline is trained" in dry_run(ce).notes
    assert not (tmp_path / "run").exists()


# -- Ctrl-C outside the training loop's own handling: every window prints the resume line --------------
def ctrl_c_at(monkeypatch, owner, name: str, when=lambda *a, **k: True) -> None:
    """Send this process SIGINT on entry to ``owner.name`` (when ``when(args)``), then go on into it."""
    import os
    import signal

    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _is_run(tmp_path):
    """For write_outputs(cfg, run_dir, ...): true for the run itself, not its baseline."""
    return lambda cfg, run_dir, *a, **k: Path(run_dir) == tmp_path / "run"


@pytest.mark.parametrize("where", ["full_student", "write_outputs"])
@pytest.mark.parametrize("baseline", [False, True])
def test_a_ctrl_c_after_a_training_loop_stops_with_the_resume_line(
    runs, tmp_path, monkeypatch, capsys, where, baseline
):
    """Once a loop had ended (its last evaluation, the student gathered or written), Ctrl-C exited 130 with
    no line, and a baseline stopped so was left without summary.json; now it says how to resume, which
    finishes the run (and its baseline) as an uninterrupted run does."""
    from kdcore.runs import runner
    from kdcore.training.engine import Trainer

    run_dir = tmp_path / "run"
    owner = Trainer if where == "full_student" else runner
    with monkeypatch.context() as patch:
        when = (lambda *a, **k: True) if baseline or where == "full_student" else _is_run(tmp_path)
        ctrl_c_at(patch, owner, where, when)
        with pytest.raises(RunInterrupted) as caught:
            run_in_process(tiny(run_dir, **{"output.baseline": True} if baseline else {}))
    what = "the CE-only baseline" if baseline else ""
    stopped = f"stopped {what} at step 12" if baseline else "stopped at step 12"
    assert str(caught.value) == f"{stopped}; resume with: kd run --resume {run_dir}"  # checkpoint 12 exists
    assert caught.value.exit_code == 130
    stopped_in = run_dir / "baseline" if baseline else run_dir
    assert not (stopped_in / "summary.json").exists() and (stopped_in / "checkpoints" / "step-12").is_dir()
    capsys.readouterr()
    resume(run_dir)
    if baseline:
        assert "inside its CE-only baseline, which had not finished" in capsys.readouterr().err
        assert_same_run(run_dir / "baseline", runs["dir"] / "with-baseline" / "baseline")
        assert_same_run(run_dir, runs["dir"] / "with-baseline")
    else:
        assert_same_run(run_dir, runs["dir"] / "kd")


def test_a_signal_during_the_last_step_after_its_check_still_stops_the_run(tmp_path, monkeypatch):
    """A SIGINT that came during the last step, after the loop's check, set the flag and was then ignored:
    the run went on. Now it checkpoints that step and stops with the resume line."""
    from kdcore.training.checkpoint import Checkpointer

    ctrl_c_at(monkeypatch, Checkpointer, "due", lambda self, step: step == 12)
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted) as caught:
        run_in_process(tiny(run_dir, **{"training.checkpoint_every": 5}))
    assert str(caught.value) == f"stopped at step 12; resume with: kd run --resume {run_dir}"
    assert (run_dir / "checkpoints" / "step-12").is_dir() and not (run_dir / "summary.json").exists()
    resume(run_dir)
    assert summary(run_dir)["steps"] == 12


def test_a_ctrl_c_through_the_cli_prints_the_resume_line(tmp_path, monkeypatch):
    from rich.console import Console
    from typer.testing import CliRunner

    from kdcore.cli import app
    from kdcore.runs import runner

    ctrl_c_at(monkeypatch, runner, "write_outputs")
    run_dir = tmp_path / "run"
    args = ["run"]
    for key, value in tiny(run_dir).items():
        args += ["--set", f"{key}={value}"]
    monkeypatch.setattr("kdcore.cli.run.err", Console(stderr=True, width=400))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert (
        result.output.strip().splitlines()[-1]
        == f"stopped at step 12; resume with: kd run --resume {run_dir}"
    )
