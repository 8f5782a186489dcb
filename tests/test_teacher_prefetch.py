"""training.teacher_prefetch: the teacher's pass on the next micro-batch in a background thread.

The teacher is frozen, in eval mode and deterministic, and each thread runs with one intra-op thread
here (``one_thread``; the prefetcher gives the teacher ``N // 2`` of ``N``, at least 1), so the
prefetched run must be the same run: every logged number and every final weight equal, tolerance 0.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import tiny_overrides
from rich.console import Console
from safetensors.torch import load_file

from kdcore.config import TrainingConfig, resolve_config
from kdcore.runs.runner import run
from kdcore.training import loss_path, prefetch, setup
from kdcore.training.curriculum import CurriculumSampler

TIMING = {"tokens_per_second"}


@pytest.fixture
def prefetchers(monkeypatch):
    """Every TeacherPrefetcher a run starts."""
    made = []
    real = prefetch.TeacherPrefetcher.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(prefetch.TeacherPrefetcher, "__init__", init)
    return made


def _run(tmp_path, name, **extra):
    cfg = resolve_config(None, tiny_overrides(tmp_path / name, **{"training.log_every": 1, **extra}))
    return run(cfg, console=Console(quiet=True), show_progress=False)


def _records(result):
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _assert_same_run(a, b):
    assert _records(a) == _records(b)
    wa = load_file(a.run_dir / "student" / "model.safetensors")
    wb = load_file(b.run_dir / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _threads_left():
    return [t for t in threading.enumerate() if t.name.startswith("kd-teacher-prefetch")]


@pytest.mark.parametrize(
    ("case", "extra", "prefetched"),
    [
        ("fused", {}, 11),  # 12 steps: every one but the first
        ("logits", {"training.loss_path": "logits"}, 11),
        ("grad-accum", {"training.grad_accum": 2}, 23),  # 24 micro-batches: within a step and across
        ("bf16", {"training.mixed_precision": "bf16"}, 11),  # the thread enters the autocast itself
        # a curriculum re-sorted every 3 steps from the KD terms observed, the open share growing: the
        # batches after a re-sort (steps 3, 6, 9) are not known during the step before, and not prefetched
        (
            "curriculum",
            {
                "strategy.scorer": "teacher-student-gap",
                "strategy.pacing": "linear",
                "strategy.refresh_every": 3,
            },
            8,
        ),
    ],
)
def test_prefetch_gives_the_same_run(
    tmp_path, prefetchers, cached_tiny_teacher, one_thread, case, extra, prefetched
):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # bf16 after float32 in one process
    plain = _run(tmp_path, "plain", **extra)
    assert not prefetchers
    ahead = _run(tmp_path, "ahead", **{"training.teacher_prefetch": True, **extra})
    AcceleratorState._reset_state(reset_partial_state=True)
    _assert_same_run(ahead, plain)
    (used,) = prefetchers
    assert (used.used, used.discarded) == (prefetched, 0)
    assert not _threads_left() and torch.get_num_threads() == 1  # closed, the main thread's count restored


def test_a_job_for_another_batch_is_discarded_never_used(monkeypatch):
    p = prefetch.TeacherPrefetcher(torch.device("cpu"))
    try:
        ids = torch.tensor([3, 1, 4])
        p.submit(5, ids, "rows", lambda: torch.ones(2))
        assert p.take(5, torch.tensor([3, 1, 5])) is None and p.discarded == 1  # other ids
        p.submit(5, ids, "rows", lambda: torch.ones(2))
        assert p.take(6, ids) is None and p.discarded == 2  # another step
        p.submit(5, ids, "rows", lambda: torch.ones(2))
        rows, out = p.take(5, ids)
        assert rows == "rows" and torch.equal(out, torch.ones(2)) and p.used == 1
        assert p.take(5, ids) is None  # taken once
    finally:
        p.close()
        p.close()  # twice is fine
    assert not _threads_left()


def test_the_thread_runs_without_gradient_with_its_share_of_the_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    p = prefetch.TeacherPrefetcher(torch.device("cpu"))
    try:
        assert torch.get_num_threads() == 2  # the main thread's share
        p.submit(0, torch.tensor([0]), None, lambda: (torch.is_grad_enabled(), torch.get_num_threads()))
        assert p.take(0, torch.tensor([0]))[1] == (False, 2)
    finally:
        p.close()
        assert torch.get_num_threads() == 4
        torch.set_num_threads(before)


@pytest.mark.parametrize(("total", "split"), [(1, (1, 1)), (2, (1, 1)), (3, (2, 1)), (16, (8, 8))])
def test_thread_split(total, split):
    assert prefetch.thread_split(total) == split


def test_an_error_in_the_thread_stops_the_run_and_ends_the_thread(
    tmp_path, monkeypatch, cached_tiny_teacher, one_thread
):
    real = loss_path.LossPath.live_teacher
    calls = []

    def failing(self, rows):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("teacher failed in the prefetch thread")
        return real(self, rows)

    monkeypatch.setattr(loss_path.LossPath, "live_teacher", failing)
    with pytest.raises(RuntimeError, match="teacher failed in the prefetch thread"):
        _run(tmp_path, "fails", **{"training.teacher_prefetch": True})
    assert all(name.startswith("kd-teacher-prefetch") for name in calls)
    assert not _threads_left() and torch.get_num_threads() == 1


def test_an_error_in_the_step_ends_the_thread(tmp_path, monkeypatch, cached_tiny_teacher, one_thread):
    real = loss_path.LossPath.forward
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("student step failed")
        return real(self, *args)

    monkeypatch.setattr(loss_path.LossPath, "forward", failing)
    with pytest.raises(RuntimeError, match="student step failed"):
        _run(tmp_path, "fails", **{"training.teacher_prefetch": True})
    assert not _threads_left() and torch.get_num_threads() == 1


def test_not_used_without_a_live_teacher_or_with_a_writing_source():
    on = TrainingConfig(teacher_prefetch=True)
    teacher = torch.nn.Linear(1, 1)
    assert setup.prefetch_problem(TrainingConfig(), None, None, False) is None  # off: nothing to say
    assert setup.prefetch_problem(on, teacher, None, False) is None
    assert "no live teacher" in setup.prefetch_problem(on, None, object(), False)
    assert "writes each batch's text" in setup.prefetch_problem(on, teacher, None, True)


def test_a_run_from_a_teacher_cache_starts_no_thread(tmp_path, prefetchers, cached_tiny_teacher, one_thread):
    from kdcore.teachers.cache import build_cache

    cfg = resolve_config(None, tiny_overrides(tmp_path / "unused"))
    build_cache(cfg, tmp_path / "k8", top_k=8, console=Console(quiet=True))
    _run(
        tmp_path, "cached", **{"training.teacher_prefetch": True, "model.teacher_cache": str(tmp_path / "k8")}
    )
    assert not prefetchers


def test_the_next_batch_is_known_unless_a_re_sort_is_due_while_samples_are_closed():
    class Half:
        def fraction(self, step, total):
            return 0.5 if step < 6 else 1.0

    sampler = CurriculumSampler(40, 4, Half(), 12, seed=0, refresh_every=3)
    sampler.refresh(None, 0)
    assert sampler.batch_known(1) and sampler.batch_known(2)
    assert not sampler.batch_known(3)  # a re-sort is due and half the samples are closed
    assert sampler.batch_known(6) and sampler.batch_known(9)  # due, but everything is open: epoch order
