"""The teacher's forward pass for the next micro-batch, run in a background thread during the student's step.

``training.teacher_prefetch: true``: while the main thread runs the student's forward and backward
pass on micro-batch ``t``, one background thread runs the frozen teacher on micro-batch ``t + 1``
(torch releases the GIL inside its operations, so both progress at once). The teacher is in eval
mode and without gradient, its forward pass deterministic: the result is the one the main thread
would have computed, and the run's numbers are the same as without prefetch.

What is prefetched must be the micro-batch actually drawn. Within a step the micro-batches are
known; the next step's first one is known when no curriculum re-sort is due before it, or when
every sample is open then (the epoch's permutation does not depend on the ordering) —
:meth:`~kdcore.training.curriculum.CurriculumSampler.batch_known`. A re-sort uses the scores the
scorer observed during the step, so across it the teacher runs in the main thread, as without
prefetch. The job is keyed by step and sample ids, and a job whose key does not match the
micro-batch drawn is discarded (never used).

Threads: torch's intra-op thread count is per thread (OpenMP, the CPU builds on Linux and
Windows), so the run's ``N`` threads (``training.threads``, or torch's default) are split: the
teacher's thread gets ``N // 2`` (at least 1) and the main thread keeps the rest (at least 1), so
the two passes together use the ``N`` cores instead of ``2N`` threads competing for them. The
main thread's count is restored by :meth:`TeacherPrefetcher.close`. On CUDA the teacher's thread
issues its work on a stream of its own, and the main thread waits for that work (an event) before
it reads the teacher's output.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TeacherPrefetcher", "thread_split"]


def thread_split(total: int) -> tuple[int, int]:
    """``(main, teacher)`` intra-op threads out of ``total``: the teacher ``total // 2``, each at least 1."""
    teacher = max(1, total // 2)
    return max(1, total - teacher), teacher


@dataclass
class _Job:
    step: int
    ids: torch.Tensor
    rows: Any
    future: concurrent.futures.Future


class TeacherPrefetcher:
    """One background thread computing the teacher's output of the next micro-batch, one job at a time.

    ``submit(step, ids, rows, fn)`` starts ``fn()`` (the teacher's forward on ``rows``) in the thread;
    ``take(step, ids)`` returns ``(rows, output)`` when the pending job is for that step and those
    sample ids, else None (a job for another micro-batch is waited for and discarded). An exception
    raised in the thread is raised again by ``take``. ``close`` waits for a running job, drops a
    pending one and ends the thread; it is safe to call twice.
    """

    def __init__(self, device: torch.device) -> None:
        self.main_threads, self.teacher_threads = thread_split(torch.get_num_threads())
        self._restore = torch.get_num_threads()
        torch.set_num_threads(self.main_threads)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="kd-teacher-prefetch",
            initializer=torch.set_num_threads,
            initargs=(self.teacher_threads,),
        )
        self._job: _Job | None = None
        self._closed = False
        self.used = 0  # jobs whose output was used
        self.discarded = 0  # jobs for another micro-batch than the one drawn

    def submit(self, step: int, ids: torch.Tensor, rows: Any, fn: Callable[[], Any]) -> None:
        if self._closed:
            raise RuntimeError("the teacher prefetcher is closed")
        if self._job is not None:  # at most one job: wait for the one not taken and drop it
            self._drop()
        self._job = _Job(step, ids.clone(), rows, self._pool.submit(self._run, fn))

    def take(self, step: int, ids: torch.Tensor) -> tuple[Any, Any] | None:
        job, self._job = self._job, None
        if job is None:
            return None
        output, event = job.future.result()  # re-raises what the thread raised
        if job.step != step or not torch.equal(job.ids, ids):
            self.discarded += 1
            return None
        if event is not None:  # CUDA: the main stream waits for the teacher's stream, which owned the memory
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            _record_stream(output, current)
        self.used += 1
        return job.rows, output

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        job, self._job = self._job, None
        if job is not None:
            job.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._restore)

    def _drop(self) -> None:
        job, self._job = self._job, None
        try:
            job.future.result()
        finally:
            self.discarded += 1

    def _run(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """In the thread: ``fn()`` without gradient (grad mode is per thread), on its own CUDA stream."""
        with torch.no_grad():
            if self.stream is None:
                return fn(), None
            # the thread's current device is its own (cuda:0 by default): the run's, explicitly
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                self.stream.wait_stream(torch.cuda.default_stream(self.device))  # what the main stream wrote
                output = fn()
                event = torch.cuda.Event()
                event.record(self.stream)
            return output, event


def _record_stream(value: Any, stream: Any) -> None:
    """Tell the CUDA allocator that ``stream`` uses the tensors in ``value`` (a tensor, dict, tuple)."""
    if isinstance(value, torch.nn.Parameter):  # the teacher's head: resident, not the thread's
        return
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, dict):
        for item in value.values():
            _record_stream(item, stream)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _record_stream(item, stream)
