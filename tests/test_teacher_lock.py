"""Two runs that need the same not-yet-trained from-scratch teacher train it once: the second waits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from conftest import tiny_overrides

#: Loads everything, says it is ready, waits for the go file, then resolves the teacher.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rich.console import Console
    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.teachers.resolve import resolve_teacher

    ready, go, overrides = Path(sys.argv[1]), Path(sys.argv[2]), eval(sys.argv[3])
    cfg = resolve_config(None, overrides)
    corpus = load_corpus(cfg.data, 0)
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    console = Console(stderr=True, width=400, soft_wrap=True)
    directory, _ = resolve_teacher(cfg.model, corpus, cfg.data.seq_len, cfg.training, console)
    print(directory)
    """
)


def test_two_processes_train_a_new_teacher_once(tmp_path):
    overrides = tiny_overrides(tmp_path / "unused", **{"model.teacher_steps": 30, "training.threads": 1})
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"ready-{i}"), str(go), repr(overrides)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.01)
    go.touch()  # both look for the teacher at the same moment
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    dirs = {out.strip() for out, _ in results}
    errs = [err for _, err in results]
    assert len(dirs) == 1
    assert sum(err.count("Training the teacher") for err in errs) == 1, errs
    assert sum("Using the cached teacher" in err for err in errs) == 1, errs
    assert sum("Waiting for another kd process that is training this teacher" in err for err in errs) == 1
    assert sorted(
        p.name for p in (tmp_path / "cache" / "teachers").iterdir() if not p.name.endswith(".lock")
    ) == [os.path.basename(dirs.pop())]
