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
    args += ["--set=data.demo_samples=160", "--set=data.max_eval_samples=32", "--set=model.teacher_steps=40"]
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
