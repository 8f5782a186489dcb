"""Shared fixtures: offline mode, an isolated cache, fake plugin distributions, a tiny trained teacher."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: A run small enough for the test suite: seconds on 2 CPU cores.
TINY_TEACHER = "gpt2:n_layer=2,n_embd=32,n_head=2"
TINY_STUDENT = "gpt2:n_layer=1,n_embd=16,n_head=2"


def tiny_overrides(output_dir: Path, **extra) -> dict:
    base = {
        "model.teacher": TINY_TEACHER,
        "model.student": TINY_STUDENT,
        "model.teacher_steps": 40,
        "data.seq_len": 48,
        "data.demo_samples": 160,
        "data.train_share": 1.0,  # all 160 texts: the demo's default share is for its 2000
        "data.max_eval_samples": 32,
        "training.max_steps": 12,
        "training.batch_size": 8,
        "training.log_every": 4,
        "training.eval_every": 6,
        "output.dir": str(output_dir),
    }
    base.update(extra)
    return base


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (a lot of it on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Spec teachers are cached per test session, never in the user's cache."""
    path = tmp_path_factory.mktemp("kd-cache")
    os.environ["KD_CACHE_DIR"] = str(path)
    return path


def write_fake_distribution(
    root: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """A minimal installed distribution on ``root`` (dist-info + modules), found by importlib.metadata."""
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[kdcore]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


#: summary fields that measure the machine, not the run
TIMING = {"wall_seconds", "tokens_per_second", "train_seconds", "run_dir", "generation_share"}


def assert_same_run(run: Path, reference: Path, ignore: set[str] = frozenset()) -> None:
    """Identical summaries (but for timings and ``ignore``), metrics, difficulty history and student weights."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    skip = TIMING | set(ignore)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}

    def records(path: Path) -> list[dict]:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]

    assert records(run) == records(reference)
    wa, wb = (load_file(r / "student" / "model.safetensors") for r in (run, reference))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ta, tb = (pq.read_table(r / "difficulty.parquet") for r in (run, reference))
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        assert np.array_equal(ta[name].to_numpy(), tb[name].to_numpy(), equal_nan=True), name


def run_kd(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run the real ``kd`` CLI in a subprocess (``python -m kdcore``)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "kdcore", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cached_tiny_teacher(isolated_cache, tmp_path_factory) -> None:
    """Train the tiny teacher of ``tiny_overrides`` once, in-process: concurrent subprocesses only read it."""
    from rich.console import Console

    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.teachers.resolve import resolve_teacher

    cfg = resolve_config(None, tiny_overrides(tmp_path_factory.mktemp("teacher")))
    resolve_teacher(cfg.model, load_corpus(cfg.data, 0), cfg.data.seq_len, cfg.training, Console(quiet=True))


def topk_teacher_in_memory(teacher_logits, k: int, dtype=None):
    """What a teacher cache stores, computed in memory: top-K log-probs at τ = 1 and the tail's f(1), f(1/2)
    (in float64, or ``dtype``)."""
    import torch
    import torch.nn.functional as F

    from kdcore.training.losses import TopKTeacher

    logp = F.log_softmax(teacher_logits.double(), -1)
    values, indices = logp.topk(k, -1)
    tail = None
    if k < logp.shape[-1]:
        rest = logp.scatter(-1, indices, float("-inf"))
        tail = torch.stack([rest.logsumexp(-1), (0.5 * rest).logsumexp(-1)], -1)
    if dtype is not None:
        values, tail = values.to(dtype), None if tail is None else tail.to(dtype)
    return TopKTeacher(values, indices, tail, logp.shape[-1])
