"""Atomic outputs: what a killed writer left is cleaned by the next write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_overrides

from kdcore.files import atomic_directory, atomic_write_text


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    gone = dead_pid()
    stale_file = tmp_path / f".summary.json.{gone}.abcd1234.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".student.{gone}.k9_x2m7q.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"\0" * 100)
    older = tmp_path / ".student.z8y7x6w5.tmp"  # an older kdcore's name, without a PID
    older.mkdir()
    live = tmp_path / f".student.{os.getpid()}.livewrit.tmp"  # a writer that is still running
    live.mkdir()
    foreign = [
        tmp_path / ".student.notours.tmp",
        tmp_path / ".other.json.1.abcd1234.tmp",
        tmp_path / "keep.tmp",
    ]
    for path in foreign:
        path.write_text("not kdcore's")

    atomic_write_text(tmp_path / "summary.json", "{}\n")
    assert not stale_file.exists() and stale_dir.exists()  # only summary.json's own temporaries
    with atomic_directory(tmp_path / "student") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale_dir.exists() and not older.exists()
    assert live.is_dir() and all(path.exists() for path in foreign)
    left = {p.name for p in tmp_path.iterdir() if p.name.startswith((".summary", ".student."))}
    assert left == {live.name, ".student.notours.tmp"}


@pytest.mark.slow
def test_a_sigkilled_cache_teacher_leaves_nothing_after_the_next_one(cached_tiny_teacher, tmp_path):
    """The case users met: kill -9 while the cache is written, then write it again."""
    args = [f"--teacher={tiny_overrides(tmp_path)['model.teacher']}", "--seq-len=48"]
    args += [
        "--set=data.demo_samples=160",
        "--set=data.train_share=1",
        "--set=data.max_eval_samples=32",
        "--set=model.teacher_steps=40",
    ]
    args += ["--set=training.batch_size=8", "--top-k=259", "--batch-size=1"]
    out = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdcore", "cache-teacher", "--output", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".cache.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "cache-teacher ended before writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".cache.*.tmp")) and not out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "kdcore", "cache-teacher", "--output", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".cache.*"))


@pytest.mark.parametrize("name", ["difficulty.parquet", "loss.png"])
def test_report_files_are_written_through_the_same_temporaries(tmp_path, name):
    from kdcore.runs.outputs import write_history, write_plots

    stale = tmp_path / f".{name}.{dead_pid()}.abcd1234.tmp"
    stale.write_text("half")
    if name == "difficulty.parquet":
        write_history(tmp_path / name, [])
    else:
        write_plots(
            tmp_path,
            [{"step": 1, "loss": 1.0, "ce": 1.0, "kd": 1.0, "lambda": 0.5, "open_share": 1.0, "lr": 0.001}],
            [],
        )
    assert (tmp_path / name).is_file() and not stale.exists()


@pytest.fixture
def umask_027():
    """A stricter umask than the default, so the modes visibly follow it."""
    before = os.umask(0o027)
    yield 0o027
    os.umask(before)


def modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_published_files_follow_the_umask(tmp_path, umask_027):
    from kdcore.files import umask

    assert umask() == 0o027
    atomic_write_text(tmp_path / "summary.json", "{}\n")
    with atomic_directory(tmp_path / "student") as tmp:
        (tmp / "model.safetensors").write_bytes(b"")
        os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes it
        (tmp / "sub").mkdir()
        (tmp / "sub" / "file").write_text("x")
    assert modes(tmp_path / "student") == {
        ".": 0o750,
        "model.safetensors": 0o640,
        "sub": 0o750,
        "sub/file": 0o640,
    }
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o640


def test_a_run_s_outputs_teacher_and_checkpoints_follow_the_umask(tmp_path, umask_027):
    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.runs.runner import run
    from kdcore.teachers.resolve import spec_teacher_dir

    overrides = tiny_overrides(tmp_path / "run", **{"model.teacher_steps": 7, "training.checkpoint_every": 6})
    cfg = resolve_config(None, overrides)
    run_dir = run(cfg, show_progress=False).run_dir
    teacher_dir = spec_teacher_dir(cfg.model, load_corpus(cfg.data, 0), 48, cfg.training)  # trained just now
    found = modes(run_dir)
    assert {"config.yaml", "summary.json", "loss.png", "student/model.safetensors"} <= set(found)
    assert "checkpoints/step-12/model.safetensors" in found
    for root, mode_of in ((run_dir, found), (teacher_dir, modes(teacher_dir))):
        wrong = {
            name: oct(mode)
            for name, mode in mode_of.items()
            if mode != (0o750 if (root / name).is_dir() else 0o640)
        }
        assert wrong == {}, root
