"""Crash safety: checkpoints, kd run --resume (bit-for-bit), graceful stop, damaged and foreign
checkpoints, missing plugins, non-finite losses.

The killed and stopped runs are real ``python -m kdcore run`` subprocesses; the reference is an
uninterrupted subprocess run of the same config, started at the same time.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_same_run, run_kd, tiny_overrides
from safetensors.torch import load_file

from kdcore.config import resolve_config, set_path
from kdcore.errors import KdError, PluginError

#: A run whose state matters on resume: scores (snapshot), pacing position, λ (threshold), dropout.
STATEFUL = {
    "strategy.scorer": "student-snapshot",
    "strategy.pacing": "root",
    "strategy.reliance": "threshold",
    "training.threads": 1,  # the same float reductions in every process
}
STEPS = 100  # ~20 ms a step: leaves a second or more between checkpoint 20 and the end for the kill


def write_config(path: Path, run_dir: Path, **extra) -> Path:
    tree: dict = {}
    for dotted, value in {**tiny_overrides(run_dir), **STATEFUL, **extra}.items():
        set_path(tree, dotted, value)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def long_config(tmp: Path, name: str, **extra) -> Path:
    return write_config(
        tmp / f"{name}.yaml",
        tmp / name,
        **{"training.max_steps": STEPS, "training.checkpoint_every": 10, "training.eval_every": 50, **extra},
    )


def start_kd(*args: str, log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "kdcore", *args], stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ)
    )


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> int:
    """Poll until a checkpoint ≥ ``at_least`` exists; its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*")]
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before checkpoint {at_least}"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint {at_least} after {timeout} s")


@pytest.fixture(scope="module")
def reference(cached_tiny_teacher, tmp_path_factory):
    """The uninterrupted run, started in the background; tests wait for it when they need it."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = start_kd("run", "-c", str(long_config(tmp, "run")), log=tmp / "log.txt")

    def finished() -> Path:
        assert proc.wait(timeout=300) == 0, (tmp / "log.txt").read_text()[-3000:]
        return tmp / "run"

    yield finished
    if proc.poll() is None:
        proc.kill()


def kill_after_a_checkpoint(config: Path, run_dir: Path, log: Path) -> None:
    """``kd run -c config``, SIGKILLed once it has written the checkpoint of step 20, before it finishes."""
    victim = start_kd("run", "-c", str(config), log=log)
    wait_for_checkpoint(run_dir, victim, at_least=20)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"


def test_sigkill_then_resume_gives_the_uninterrupted_result(reference, tmp_path):
    config = long_config(tmp_path, "run")
    run_dir = tmp_path / "run"
    kill_after_a_checkpoint(config, run_dir, tmp_path / "log.txt")

    resumed = run_kd("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr
    assert_same_run(run_dir, reference())
    # only the newest output.keep_checkpoints (2) remain, and no half-written one
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-100", "step-90"]


#: Half the rows continued by the student: generation must be seeded by (seed, step, sample id), not by
#: the RNG state of the process, for a resumed run to write the same continuations.
MIXED = {
    "strategy.source": {
        "name": "mixed",
        "params": {"fraction": 0.5, "prompt_tokens": 16, "max_new_tokens": 16},
    }
}


@pytest.fixture(scope="module")
def mixed_reference(cached_tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed-reference")
    proc = start_kd("run", "-c", str(long_config(tmp, "run", **MIXED)), log=tmp / "log.txt")
    yield tmp / "run", proc
    if proc.poll() is None:
        proc.kill()


def test_sigkill_then_resume_with_generated_rows_gives_the_uninterrupted_result(mixed_reference, tmp_path):
    config = long_config(tmp_path, "run", **MIXED)
    run_dir = tmp_path / "run"
    kill_after_a_checkpoint(config, run_dir, tmp_path / "log.txt")

    resumed = run_kd("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_dir, proc = mixed_reference
    assert proc.wait(timeout=300) == 0
    assert_same_run(run_dir, reference_dir)
    shares = [
        json.loads(x)["generated"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in x
    ]
    assert all(0 < share < 1 for share in shares)  # the run did train on continuations


def test_sigterm_stops_after_a_checkpoint_and_resumes_exactly(reference, tmp_path):
    from kdcore.runs.runner import run
    from kdcore.training.checkpoint import resume_config

    config = long_config(tmp_path, "run")
    run_dir = tmp_path / "run"
    victim = start_kd("run", "-c", str(config), log=tmp_path / "log.txt")
    wait_for_checkpoint(run_dir, victim, at_least=10)
    os.kill(victim.pid, signal.SIGTERM)
    assert victim.wait(timeout=60) == 143
    log = (tmp_path / "log.txt").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("stopped at step ")]
    assert stopped, log[-2000:]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert stopped[0] == f"stopped at step {step}; resume with: kd run --resume {run_dir}"
    assert (run_dir / "checkpoints" / f"step-{step}" / "checkpoint.json").is_file()
    assert "Traceback" not in log

    run(resume_config(run_dir), resume=True, show_progress=False)  # in-process: same numbers
    assert_same_run(run_dir, reference())


# -- refusals and fallbacks, on a short in-process run ------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """12 steps, a checkpoint every 4, the newest 2 kept: step-8 and step-12."""
    from kdcore.runs.runner import run

    tmp = tmp_path_factory.mktemp("short")
    overrides = {**tiny_overrides(tmp / "run"), **STATEFUL, "training.checkpoint_every": 4}
    return run(resolve_config(None, overrides), show_progress=False).run_dir


def unfinished_copy(run_dir: Path, tmp_path: Path) -> Path:
    """The run as a crash after its last checkpoint would leave it: no summary, no student."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "summary.json").unlink()
    shutil.rmtree(copy / "student")
    return copy


def resume_in_process(run_dir: Path, capsys=None):
    from rich.console import Console

    from kdcore.runs.runner import run
    from kdcore.training.checkpoint import resume_config

    console = Console(stderr=True, soft_wrap=True, width=400)
    return run(resume_config(run_dir), resume=True, show_progress=False, console=console)


def test_only_the_newest_checkpoints_are_kept(short_run):
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == ["step-12", "step-8"]


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(short_run, tmp_path, capsys):
    run_dir = unfinished_copy(short_run, tmp_path)
    weights = run_dir / "checkpoints" / "step-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    resume_in_process(run_dir)
    err = capsys.readouterr().err
    assert f"checkpoint {weights.parent} is damaged: model.safetensors has" in err
    assert "trying the previous checkpoint" in err
    assert f"Resuming {run_dir} from {run_dir / 'checkpoints' / 'step-8'} (step 8)" in err
    assert_same_run(run_dir, short_run)  # step-8 + 4 steps = the uninterrupted 12


def test_a_checkpoint_with_a_missing_file_is_damaged(short_run, tmp_path):
    from kdcore.training.checkpoint import CheckpointDamaged, verify

    run_dir = unfinished_copy(short_run, tmp_path)
    (run_dir / "checkpoints" / "step-8" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointDamaged, match=r"step-8 is damaged: optimizer.bin is missing"):
        verify(run_dir / "checkpoints" / "step-8")
    (run_dir / "checkpoints" / "step-12" / "checkpoint.json").unlink()
    with pytest.raises(
        KdError, match=r"no valid checkpoint in .*checkpoint.json is missing.*optimizer.bin is missing"
    ):
        resume_in_process(run_dir)


def test_a_checkpoint_from_another_config_is_refused(short_run, tmp_path):
    run_dir = unfinished_copy(short_run, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["training"]["lr"] = 0.001
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(KdError, match=r"step-12 was written with training.lr=0.003, the run has 0.001"):
        resume_in_process(run_dir)


def test_resuming_without_the_plugin_names_the_package(short_run, tmp_path, monkeypatch):
    run_dir = unfinished_copy(short_run, tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["strategy"]["scorer"] = {"name": "loss-trend", "params": {}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    meta = yaml.safe_load((run_dir / "strategies.yaml").read_text())
    meta["scorer"] = {
        "name": "loss-trend",
        "params": {},
        "distribution": "kd-plugin-loss-trend",
        "version": "0.1.0",
    }
    (run_dir / "strategies.yaml").write_text(yaml.safe_dump(meta))
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kd-plugin-loss-trend")
    with pytest.raises(
        PluginError,
        match=r"scorer 'loss-trend' from kd-plugin-loss-trend 0.1.0.*pip install kd-plugin-loss-trend",
    ):
        resume_in_process(run_dir)


def test_resume_takes_no_other_option_and_no_finished_run(short_run, tmp_path):
    from typer.testing import CliRunner

    from kdcore.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["run", "--resume", str(short_run), "--lr", "0.1", "--set", "training.seed=1"]
    )
    assert result.exit_code == 2
    assert "--resume continues the run exactly as" in result.output and "drop --lr, --set" in result.output
    result = runner.invoke(app, ["run", "--resume", str(short_run)])
    assert result.exit_code == 2 and "holds a finished run" in result.output
    result = runner.invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run directory" in result.output


# -- the backend and the number of processes --------------------------------------------------------------------
def edited_checkpoint(short_run: Path, tmp_path: Path, **meta_changes) -> tuple[Path, dict]:
    """A copy of the run whose newest checkpoint's metadata says ``meta_changes`` (None removes a key)."""
    run_dir = unfinished_copy(short_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-8")
    meta_path = run_dir / "checkpoints" / "step-12" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))
    return run_dir, yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_checkpoint_records_backend_processes_and_dropout(short_run):
    meta = json.loads((short_run / "checkpoints" / "step-12" / "checkpoint.json").read_text())
    assert meta["format"] == 2 and meta["world_size"] == 1 and meta["backend"] == {"type": "ddp"}
    assert meta["dropout"] == "transformer.drop p=0.1"  # the tiny GPT-2 student keeps GPT-2's dropout


def test_a_checkpoint_from_another_backend_is_refused(short_run, tmp_path):
    from kdcore.training.checkpoint import find_checkpoint

    backend = {"type": "fsdp", "state_dict_type": "SHARDED_STATE_DICT"}
    run_dir, config = edited_checkpoint(short_run, tmp_path, backend=backend)
    with pytest.raises(KdError) as info:
        find_checkpoint(run_dir, config, {"type": "ddp", "world_size": 1}, print)
    assert str(info.value) == (
        f"checkpoint {run_dir / 'checkpoints' / 'step-12'} was written under FSDP (SHARDED_STATE_DICT) and "
        "this run uses DDP (or one process), whose checkpoint files differ; resume it with the accelerate "
        f"config it was written with (accelerate launch --config_file CONFIG -m kdcore run --resume {run_dir})"
    )
    run_dir, config = edited_checkpoint(short_run, tmp_path / "b", backend={"type": "ddp"})
    with pytest.raises(
        KdError, match=r"written under DDP \(or one process\) and this run uses FSDP.*without"
    ):
        find_checkpoint(run_dir, config, {**backend, "world_size": 1}, print)


def test_another_process_count_is_refused_when_the_student_uses_dropout(short_run, tmp_path):
    from kdcore.training.checkpoint import find_checkpoint

    run_dir, config = edited_checkpoint(short_run, tmp_path, world_size=2)
    with pytest.raises(KdError) as info:
        find_checkpoint(run_dir, config, {"type": "ddp", "world_size": 1}, print)
    assert str(info.value) == (
        f"checkpoint {run_dir / 'checkpoints' / 'step-12'} was written by 2 processes and this run has 1; "
        "the student uses dropout (transformer.drop p=0.1), whose masks are drawn per process, so the "
        "continued run could not match an uninterrupted one; resume with 2 processes (accelerate launch "
        f"--num_processes 2 -m kdcore run --resume {run_dir})"
    )


def test_another_process_count_continues_without_dropout_with_a_note(short_run, tmp_path):
    from kdcore.training.checkpoint import find_checkpoint

    notes: list[str] = []
    run_dir, config = edited_checkpoint(short_run, tmp_path, world_size=2, dropout=False)
    found = find_checkpoint(run_dir, config, {"type": "ddp", "world_size": 1}, notes.append)
    assert found is not None and found[0] == run_dir / "checkpoints" / "step-12"
    assert notes == [
        f"checkpoint {found[0]} was written by 2 processes and this run has 1: continuing, with a result "
        "equal to the uninterrupted run's up to float rounding (not bit for bit)"
    ]


def test_a_deepspeed_checkpoint_is_not_resumed(short_run, tmp_path):
    """DeepSpeed loads its own files with plain pickle, which can run code."""
    from kdcore.training.checkpoint import find_checkpoint

    deepspeed = {"type": "deepspeed", "zero_stage": 3}
    run_dir, config = edited_checkpoint(short_run, tmp_path, backend=deepspeed)
    with pytest.raises(KdError) as info:
        find_checkpoint(run_dir, config, {**deepspeed, "world_size": 1}, print)
    assert str(info.value) == (
        f"checkpoint {run_dir / 'checkpoints' / 'step-12'} was written under DeepSpeed, which loads its "
        "files with a pickle that can run code, so kdcore does not resume it; start a new run (its files "
        "stay in the checkpoint)"
    )


def test_a_format_1_checkpoint_resumes_only_on_its_process_count(short_run, tmp_path):
    from kdcore.training.checkpoint import find_checkpoint

    run_dir, config = edited_checkpoint(
        short_run, tmp_path, format=1, world_size=2, backend=None, dropout=None
    )
    assert find_checkpoint(run_dir, config, {"type": "ddp", "world_size": 2}, print) is not None
    with pytest.raises(KdError, match=r"does not record whether the student uses dropout; resume with 2"):
        find_checkpoint(run_dir, config, {"type": "ddp", "world_size": 1}, print)


def sharded_state(step: Path) -> Path:
    """torch's distributed checkpoint of a small state, as FSDP writes it, listed in checkpoint.json."""
    import torch.distributed.checkpoint as dcp

    from kdcore.files import file_sha256

    dcp.save({"w": torch.ones(3), "step": 4}, checkpoint_id=step / "pytorch_model_fsdp_0", no_dist=True)
    meta = json.loads((step / "checkpoint.json").read_text())
    for file in (step / "pytorch_model_fsdp_0").iterdir():
        meta["files"][f"pytorch_model_fsdp_0/{file.name}"] = {
            "bytes": file.stat().st_size,
            "sha256": file_sha256(file),
        }
    (step / "checkpoint.json").write_text(json.dumps(meta))
    return step / "pytorch_model_fsdp_0" / ".metadata"


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch ran",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_index_that_would_run_code_is_not_loaded(short_run, tmp_path, monkeypatch):
    """torch loads a distributed checkpoint's .metadata with plain pickle; kdcore checks it first."""
    import pickle

    from kdcore.files import file_sha256
    from kdcore.training.checkpoint import CheckpointDamaged, verify

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    index = sharded_state(step)
    verify(step)  # torch's own index passes
    index.write_bytes(pickle.dumps(RunsCode()))
    meta = json.loads((step / "checkpoint.json").read_text())  # the attacker fixes the checksum too
    meta["files"]["pytorch_model_fsdp_0/.metadata"] = {
        "bytes": index.stat().st_size,
        "sha256": file_sha256(index),
    }
    (step / "checkpoint.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointDamaged,
        match=r"step-12 is damaged: pytorch_model_fsdp_0/.metadata calls posix.system when loaded",
    ):
        verify(step)
    assert not (tmp_path / "ran").exists()


def test_damage_in_a_checkpoint_subdirectory_is_named(short_run, tmp_path):
    """FSDP writes its sharded state into subdirectories; they are checksummed like any file."""
    from kdcore.files import file_sha256
    from kdcore.training.checkpoint import CheckpointDamaged, verify

    run_dir = unfinished_copy(short_run, tmp_path)
    step = run_dir / "checkpoints" / "step-12"
    shard = step / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.parent.mkdir()
    shard.write_bytes(b"x" * 100)
    meta = json.loads((step / "checkpoint.json").read_text())
    meta["files"]["pytorch_model_fsdp_0/__1_0.distcp"] = {"bytes": 100, "sha256": file_sha256(shard)}
    (step / "checkpoint.json").write_text(json.dumps(meta))
    verify(step)
    shard.write_bytes(b"x" * 99 + b"y")
    with pytest.raises(
        CheckpointDamaged, match=r"step-12 is damaged: pytorch_model_fsdp_0/__1_0.distcp does not"
    ):
        verify(step)


# -- non-finite losses ------------------------------------------------------------------------------------------
@pytest.fixture
def nan_at_step_3(cached_tiny_teacher, monkeypatch):
    """The loss of the second sample of step 3's batch becomes NaN (and with it every gradient).

    Yields the sample ids of every forward pass of the run (one per step: grad_accum is 1); the teacher
    is trained before the patch, so its training steps are not counted.
    """
    import kdcore.training.loss_path

    real, seen = kdcore.training.loss_path.LossPath.forward, []

    def poisoned(self, rows, sample_ids, *args):
        terms, observed = real(self, rows, sample_ids, *args)
        seen.append(sample_ids.clone())
        if len(seen) == 3:
            poison = torch.ones_like(terms.ce)
            poison[1] = float("nan")
            terms.ce = terms.ce * poison
        return terms, observed

    monkeypatch.setattr(kdcore.training.loss_path.LossPath, "forward", poisoned)
    return seen


def test_a_nan_loss_stops_the_run_naming_step_samples_and_checkpoint(nan_at_step_3, tmp_path):
    from kdcore.runs.runner import run

    overrides = {**tiny_overrides(tmp_path / "run"), **STATEFUL, "training.checkpoint_every": 2}
    with pytest.raises(KdError) as caught:
        run(resolve_config(None, overrides), show_progress=False)
    message = str(caught.value)
    assert message.startswith(f"non-finite loss at step 3 (sample ids [{int(nan_at_step_3[2][1])}]); ")
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-2'}" in message
    assert "training.on_nonfinite: skip" in message
    assert not (tmp_path / "run" / "checkpoints" / "step-3").exists()


def test_skip_drops_the_update_of_a_nan_batch_and_logs_it(nan_at_step_3, tmp_path):
    from kdcore.runs.runner import run

    overrides = {
        **tiny_overrides(tmp_path / "run"),
        **STATEFUL,
        "training.checkpoint_every": 1,
        "training.on_nonfinite": "skip",
        "training.max_steps": 4,
        "output.keep_checkpoints": 10,
    }
    result = run(resolve_config(None, overrides), show_progress=False)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert len(skipped) == 1 and skipped[0]["step"] == 3 and skipped[0]["skipped"] == "non-finite loss"
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN averaged in
    checkpoints = result.run_dir / "checkpoints"
    before, after = (load_file(checkpoints / f"step-{n}" / "model.safetensors") for n in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed no weight
    last = load_file(checkpoints / "step-4" / "model.safetensors")
    assert not all(torch.equal(after[k], last[k]) for k in after)  # step 4 trained again
    assert all(bool(torch.isfinite(v).all()) for v in last.values())


# -- a checkpoint never runs code ----------------------------------------------------------------------------
class Payload:
    """Pickles as a call to ``exec`` that writes ``marker``: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def plant_payload(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace ``name`` with a pickle that runs code, and fix its size and hash in checkpoint.json, as
    whoever edits the file can."""
    from kdcore.files import file_sha256

    file = checkpoint / name
    torch.save({"step": Payload(marker), "random_state": Payload(marker)}, file)
    meta_path = checkpoint / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    meta_path.write_text(json.dumps(meta))


def test_a_crafted_pickle_in_the_only_checkpoint_is_refused_without_running(short_run, tmp_path):
    run_dir = unfinished_copy(short_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-8")
    checkpoint, marker = run_dir / "checkpoints" / "step-12", tmp_path / "payload-ran"
    plant_payload(checkpoint, "trainer_state.pt", marker)
    result = run_kd("run", "--resume", str(run_dir))
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    assert f"checkpoint {checkpoint} is damaged: trainer_state.pt calls exec when loaded" in result.stderr
    assert "Traceback" not in result.stderr and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    "name", ["trainer_state.pt", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"]
)
def test_a_crafted_pickle_makes_a_checkpoint_damaged_and_the_previous_one_is_used(
    short_run, tmp_path, capsys, name
):
    run_dir = unfinished_copy(short_run, tmp_path)
    checkpoint, marker = run_dir / "checkpoints" / "step-12", tmp_path / "payload-ran"
    plant_payload(checkpoint, name, marker)
    resume_in_process(run_dir)
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} is damaged: {name} calls exec when loaded" in err
    assert f"Resuming {run_dir} from {run_dir / 'checkpoints' / 'step-8'} (step 8)" in err
    assert_same_run(run_dir, short_run)


def test_an_unlisted_pickle_is_checked_too(short_run, tmp_path):
    """A pickle that checkpoint.json does not list (a scaler.pt added later) is loaded by accelerate all the same."""
    from kdcore.training.checkpoint import CheckpointDamaged, verify

    checkpoint, marker = short_run / "checkpoints" / "step-8", tmp_path / "payload-ran"
    copy = tmp_path / "step-8"
    shutil.copytree(checkpoint, copy)
    torch.save({"scale": Payload(marker)}, copy / "scaler.pt")
    with pytest.raises(CheckpointDamaged, match=r"scaler.pt calls exec when loaded"):
        verify(copy)
    assert not marker.exists()


def test_a_strategy_state_that_cannot_load_safely_is_refused_when_saving(tmp_path):
    from kdcore.training.checkpoint import check_storable

    state = {"step": 1, "strategies": {"scorer": {"when": Path("x")}, "pacing": {}}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with pytest.raises(KdError, match=r"the scorer's state_dict\(\): .*calls pathlib"):
        check_storable(state, buffer.getvalue())


def test_a_second_ctrl_c_stops_at_once_and_still_prints_the_resume_command(cached_tiny_teacher, tmp_path):
    config = long_config(tmp_path, "run")
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start_kd("run", "-c", str(config), log=log)
    wait_for_checkpoint(run_dir, proc, at_least=10)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # two signals at once would be delivered as one
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    resume = rf"resume (from step \d+ )?with: kd run --resume {run_dir}$"
    assert re.match(rf"stopped at step \d+( without a checkpoint)?; {resume}", last), text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text


def test_the_python_resume_of_the_docs_uses_the_public_api_and_works(short_run, tmp_path, monkeypatch):
    from conftest import REPO

    import kdcore

    text = (REPO / "docs" / "resume.md").read_text()
    (code,) = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert "kdcore." not in code.replace("kdcore.run(", "")  # nothing outside kdcore.__all__
    assert "run" in kdcore.__all__
    run_dir = unfinished_copy(short_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(code.replace("runs/a", run_dir.name), {"__name__": "docs_resume"})
    assert_same_run(run_dir, short_run)


@pytest.mark.parametrize("hold", [False, True])
def test_after_a_stop_late_signals_are_ignored_only_by_a_process_that_exits(hold):
    """kd run exits after a stop: a Ctrl-C arriving during its shutdown must not raise there."""
    from kdcore.training.checkpoint import GracefulStop

    before = signal.getsignal(signal.SIGINT)
    try:
        with GracefulStop(True, hold_after_stop=hold) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
            assert stop.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is (signal.SIG_IGN if hold else before)
    finally:
        signal.signal(signal.SIGINT, before)


def test_without_a_stop_the_previous_handlers_come_back_even_when_holding():
    from kdcore.training.checkpoint import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(True, hold_after_stop=True):
        pass
    assert signal.getsignal(signal.SIGTERM) is before
