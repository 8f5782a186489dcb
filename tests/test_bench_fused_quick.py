"""bench/fused_loss_memory.py --quick runs and prints its ratio lines (the full run is a script)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fused_loss_memory.py"


def test_fused_loss_memory_quick():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for line in (
        "ratio V=8192 random: kd-fused/ce-fused peak memory",
        "kd-naive/kd-fused peak memory",
        "ratio V=8192 random: kd-fused/kd-naive time",
    ):
        match = re.search(re.escape(line) + r" = (\d+\.\d+)x", done.stdout)
        assert match, f"no '{line} = <ratio>' in:\n{done.stdout}"
        assert float(match.group(1)) > 0
