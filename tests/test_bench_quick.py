"""Each benchmark runs with --quick and prints its ratio lines (the full runs are scripts, see docs/performance.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

#: script -> ratio lines its --quick run must print
EXPECTED = {
    "step_time.py": [
        "ratio live/(ce+teacher-fwd) step time",
        "ratio live/ce step time",
        "ratio cache-k32/ce step time",
    ],
    "peers.py": ["ratio kdcore/hf-trainer tokens/s", "ratio kdcore-cache/hf-trainer tokens/s"],
    "loss_memory.py": ["ratio V=8192 [mmap threshold 64 KiB]: naive/chunked peak memory"],
    "overhead.py": ["ratio snapshot/plain step time", "ratio curriculum/plain step time"],
    "loss_time.py": ["ratio ce forced-checkpoint/default time", "ratio cache-k32/ce loss time (default)"],
    "topk_error.py": ["ratio K=8/live student eval ppl", "ratio KD term K=32/full, trained student, τ=2"],
    "source_time.py": [
        "ratio on-policy/dataset step time",
        "ratio on-policy generating/step time",
        "ratio generation no-cache/cache time",
    ],
}
#: scripts that take --threads
THREADED = {"step_time.py", "peers.py", "overhead.py", "source_time.py"}


def test_every_benchmark_runs_quick_and_prints_its_ratios():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    # All at once: most of each run is interpreter and import start-up, which overlaps well.
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(BENCH / name),
                "--quick",
                *(["--threads", "1"] if name in THREADED else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=BENCH,
        )
        for name in EXPECTED
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        for line in EXPECTED[name]:
            match = re.search(re.escape(line) + r".*= (\d+\.\d+)x?", out)
            assert match, f"{name} did not print '{line} = <ratio>':\n{out}"
            assert float(match.group(1)) > 0


def test_the_gpu_check_runs_every_arm_on_cpu():
    """bench/gpu_check.py is for a CUDA machine; its --cpu-smoke path keeps every arm's code running."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--cpu-smoke", "--no-trl"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=BENCH, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for arm in ("kdcore-fused", "kdcore-logits", "kdcore-prefetch", "kdcore-cache", "ce"):
        row = re.search(rf"^{arm} +(\d+\.\d+) +(\d+) +n/a$", done.stdout, re.M)
        assert row and float(row.group(1)) > 0 and int(row.group(2)) > 0, done.stdout
    for variant in ("ce-fused", "kd-fused", "kd-naive"):
        assert re.search(rf"^loss {variant} +n/a$", done.stdout, re.M), done.stdout
    assert re.search(r"ratio kdcore-fused/ce tokens/s = \d+\.\d+", done.stdout)


def test_the_gpu_check_without_a_gpu_says_to_use_the_smoke_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU runs the real check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, env=env, cwd=BENCH
    )
    assert done.returncode == 1 and "no CUDA device: run with --cpu-smoke" in done.stderr


@pytest.mark.slow  # three fresh processes with their imports: about a minute on 2 cores
def test_the_real_teacher_bench_runs_its_new_arms_quick():
    """bench/real_teacher_speed.py --quick (a tiny random pair): bf16 with prefetch and the fused cache arm,
    each in its own process, in the one table with ratios (all arms: docs/performance.md)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    arms = ("kdcore-bf16-prefetch", "kdcore-cache-fused", "hf-trainer")
    cmd = [
        sys.executable,
        str(BENCH / "real_teacher_speed.py"),
        "--quick",
        "--threads",
        "1",
        "--arms",
        ",".join(arms),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=BENCH, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for arm in arms:
        row = re.search(
            rf"^{arm} +1 +(\d+\.\d+) +(\d+) +(\d+) MiB +(\d+\.\d+) +(\d+\.\d+)$", done.stdout, re.M
        )
        assert row and float(row.group(1)) > 0 and float(row.group(4)) > 0, done.stdout
    assert re.search(r"ratio kdcore-cache-fused/hf-trainer at 1 thread\(s\) tokens/s = \d+\.\d+", done.stdout)
