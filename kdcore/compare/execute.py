"""Running a plan: every arm and seed as an ordinary ``kd run``, in this process or as subprocesses.

Runs that finished before (``summary.json``) are reused, partial ones continued from their last
checkpoint; a matched-λ baseline is queued as soon as its reliance arm's run for the seed is done, an
equal-time run as soon as its arm's and the kd arm's runs for the seed are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from kdcore.compare.arms import Arm, matched_strategy
from kdcore.compare.plan import PLAN, Plan, arm_config
from kdcore.compare.render import render_markdown, write_comparison_plots
from kdcore.compare.results import RunOutcome, summarise, train_seconds
from kdcore.compare.teacher import describe_models, prepare_teacher_cache, resolve_plan_teacher
from kdcore.config import RunConfig
from kdcore.files import atomic_write_json, atomic_write_text
from kdcore.inputs.models import remote_code_warning
from kdcore.summary import SUMMARY_FILE, RunSummary


@dataclass
class Task:
    arm: Arm
    seed: int
    lam: float | None = None  # a matched-λ baseline's λ
    steps: int | None = None  # an equal-time run's steps

    @property
    def key(self) -> tuple[str, int]:
        return self.arm.name, self.seed


def run_dir_for(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "runs" / arm / f"seed-{seed}"


def first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return lines[-1] if lines else "unknown error"


def resumable(run_dir: Path) -> bool:
    """A partial run the engine can continue (``kd run --resume``): it wrote config.yaml, not summary.json."""
    return (run_dir / "config.yaml").is_file() and not (run_dir / SUMMARY_FILE).exists()


def _failure(exc: BaseException) -> dict[str, Any]:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"status": "failed", "error": f"{type(exc).__name__}: {message}".rstrip(": ")}


def execute_in_process(cfg_dict: dict[str, Any], log_path: str, resume: bool = False) -> dict[str, Any]:
    """Run one arm-seed in this process; never raises (the outcome says ok or failed).

    ``resume``: continue the partial run in ``output.dir`` from its last checkpoint; if that fails,
    remove the directory and run it from scratch.
    """
    from rich.console import Console

    from kdcore.runs import runner

    cfg = RunConfig.model_validate(cfg_dict)
    run_dir = Path(cfg.output.dir)
    with open(log_path, "a" if resume else "w") as handle:
        console = Console(file=handle, width=120, soft_wrap=True)
        if resume and resumable(run_dir):
            try:
                return {
                    "status": "ok",
                    "summary": runner.run(cfg, console=console, show_progress=False, resume=True).summary,
                }
            except Exception:
                handle.write(traceback.format_exc())
                handle.write("\nresume failed; running from scratch\n")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            result = runner.run(cfg, console=console, show_progress=False)
        except Exception as exc:
            handle.write(traceback.format_exc())
            return _failure(exc)
    return {"status": "ok", "summary": result.summary}


def execute_subprocess(
    cfg_dict: dict[str, Any], log_path: str, threads: int, resume: bool = False
) -> dict[str, Any]:
    """Run one arm-seed as ``python -m kdcore run --config <yaml>`` (for --jobs > 1).

    ``resume``: first ``python -m kdcore run --resume <run dir>``; if that fails, from scratch.
    """
    run_dir = Path(cfg_dict["output"]["dir"])
    config_path = Path(log_path).with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    attempts = []
    if resume and resumable(run_dir):
        attempts.append(["run", "--resume", str(run_dir)])
    attempts.append(["run", "--config", str(config_path)])
    proc = None
    with open(log_path, "a" if resume else "w") as handle:
        for i, args in enumerate(attempts):
            if args[1] == "--config" and run_dir.exists():
                shutil.rmtree(run_dir)
            if i:
                handle.write("\nresume failed; running from scratch\n")
                handle.flush()
            proc = subprocess.run(
                [sys.executable, "-m", "kdcore", *args], stdout=handle, stderr=subprocess.STDOUT, env=env
            )
            summary = RunSummary.read(run_dir) if proc.returncode == 0 else None
            if summary is not None:
                return {"status": "ok", "summary": summary}
    text = Path(log_path).read_text(errors="replace")
    code = proc.returncode if proc is not None else "?"
    return {"status": "failed", "error": first_error_line(text) + f" (exit code {code})"}


class Comparison:
    """Runs a :class:`Plan` into ``out_dir`` and writes the table."""

    def __init__(
        self,
        plan: Plan,
        out_dir: Path,
        *,
        jobs: int = 1,
        log: Callable[[str], None] = print,
        console: Any = None,
    ) -> None:
        self.plan, self.out_dir, self.jobs = plan, out_dir, max(1, jobs)
        self.log = log
        self.console = console
        self.outcomes: dict[tuple[str, int], RunOutcome] = {}
        self.matched_arms: dict[str, Arm] = {}
        self.timed_arms = {arm.name: self.timed_arm(arm) for arm in plan.timed_arms()}
        self._timed_queued: set[tuple[str, int]] = set()
        self.teacher: dict[str, Any] = {}
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self.cache_dir: str | None = None
        self._resume: set[tuple[str, int]] = set()
        self.started: float | None = None  # when run() began
        self.done = 0  # runs finished, reused or skipped so far (for the progress lines)
        self.training = False  # True once the arms' runs begin (before: the teacher, the teacher cache)
        self.total = self.planned_runs()

    # -- tasks ---------------------------------------------------------------------------------------
    def matched_arm(self, source: Arm) -> Arm:
        name = f"kd@matched-{source.name}"
        if name not in self.matched_arms:
            self.matched_arms[name] = Arm(
                name,
                matched_strategy(source.strategy, 0.5),
                role="matched",
                spec=f"reliance:fixed(value=<mean λ of {source.name}>)",
                matched_to=source.name,
                auto=True,
            )
        return self.matched_arms[name]

    @staticmethod
    def timed_arm(source: Arm) -> Arm:
        return Arm(
            f"{source.name}@equal-time",
            source.strategy,
            role="equal-time",
            spec=f"{source.spec or source.name} for the kd arm's training time",
            timed_to=source.name,
            auto=True,
        )

    def config_for(self, task: Task) -> RunConfig:
        arm = task.arm
        if task.lam is not None:
            arm = Arm(arm.name, matched_strategy(arm.strategy, task.lam), role=arm.role)
        return arm_config(
            self.plan,
            arm,
            task.seed,
            run_dir_for(self.out_dir, task.arm.name, task.seed),
            threads=self.threads,
            teacher=self.plan.teacher_dir,
            teacher_cache=self.cache_dir,
            max_steps=task.steps,
        )

    def run(self) -> dict[str, Any]:
        self.started = time.perf_counter()
        model = RunConfig.model_validate(self.plan.base).model
        remote = remote_code_warning(model.teacher, model.student, model.trust_remote_code)
        if remote:
            self.log(remote)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        console = self.console or Console(stderr=True)
        teacher_dir = resolve_plan_teacher(self.plan, console, self.teacher)
        atomic_write_text(self.out_dir / PLAN, self.plan.to_yaml())
        self.log(f"teacher: {teacher_dir}")
        self.teacher.update(describe_models(self.plan))
        self.cache_dir = prepare_teacher_cache(self.plan, self.out_dir, console, self.log, self.teacher)
        self.training = True
        primary = [Task(arm, seed) for seed in self.plan.seeds for arm in self.plan.arms]
        ready: deque[Task] = deque()
        for task in primary:
            if not self._reuse(task):
                ready.append(task)
            else:
                self._release(task, ready)
        self._drain(ready)
        return self.finish(table_only=False)

    def _reuse(self, task: Task) -> bool:
        """A run directory with summary.json is done; a partial one is removed (and redone)."""
        run_dir = run_dir_for(self.out_dir, task.arm.name, task.seed)
        summary = RunSummary.read(run_dir)
        if summary is not None:
            self.outcomes[task.key] = RunOutcome(
                task.arm.name, task.seed, "ok", str(run_dir), summary, reused=True
            )
            self.done += 1
            self.log(f"[{self.done}/{self.total}] {task.arm.name} seed {task.seed}: finished before, reused")
            return True
        if resumable(run_dir):
            self._resume.add(task.key)
            self.log(
                f"{task.arm.name} seed {task.seed}: a partial run, continuing it from its last checkpoint"
            )
        elif run_dir.exists():
            shutil.rmtree(run_dir)
            self.log(f"{task.arm.name} seed {task.seed}: removed a partial run directory, redoing it")
        return False

    def _release(self, task: Task, ready: deque) -> None:
        """After a run: queue what waited for it, first in line (a matched-λ baseline, equal-time runs)."""
        self._release_timed(task.seed, ready)
        if not (self.plan.matched and task.arm.role == "arm" and task.arm.varies_lambda()):
            return
        outcome = self.outcomes[task.key]
        matched = self.matched_arm(task.arm)
        follow = Task(matched, task.seed)
        if outcome.status != "ok":
            self._skip(follow, f"{task.arm.name} seed {task.seed} failed, so its mean λ is unknown")
            return
        if self._reuse(follow):
            return
        follow.lam = round(float(outcome.summary.mean_lambda), 4)
        ready.appendleft(follow)

    def _release_timed(self, seed: int, ready: deque) -> None:
        """Queue ``ARM@equal-time`` for ``seed`` once ARM's and the kd arm's runs for it are done: ARM for
        as many steps as fit in the kd run's training time, at ARM's measured time per step."""
        kd = self.outcomes.get((self.plan.kd.name, seed))
        for name, timed in self.timed_arms.items():
            arm, follow = self.outcomes.get((name, seed)), Task(timed, seed)
            if kd is None or arm is None or follow.key in self._timed_queued:
                continue
            self._timed_queued.add(follow.key)
            if kd.status != "ok" or arm.status != "ok":
                self._skip(
                    follow, f"{name} or {self.plan.kd.name} seed {seed} failed, so the time budget is unknown"
                )
            elif not self._reuse(follow):
                follow.steps = equal_time_steps(kd.summary, arm.summary)
                ready.appendleft(follow)

    def _skip(self, task: Task, reason: str) -> None:
        run_dir = str(run_dir_for(self.out_dir, task.arm.name, task.seed))
        self.outcomes[task.key] = RunOutcome(task.arm.name, task.seed, "skipped", run_dir, error=reason)
        self.done += 1

    def _record(self, task: Task, result: dict[str, Any], seconds: float) -> None:
        run_dir = str(run_dir_for(self.out_dir, task.arm.name, task.seed))
        outcome = RunOutcome(
            task.arm.name, task.seed, result["status"], run_dir, result.get("summary"), result.get("error")
        )
        self.outcomes[task.key] = outcome
        self.done += 1
        if outcome.status == "ok":
            s = outcome.summary
            detail = f"student ppl {s.student_eval_ppl:.3f}, mean λ {s.mean_lambda:.3f}, {seconds:.0f} s"
        else:
            detail = f"FAILED: {outcome.error}"
        self.log(f"[{self.done}/{self.total}] {task.arm.name} seed {task.seed}: {detail}")

    def _log_path(self, task: Task) -> str:
        path = run_dir_for(self.out_dir, task.arm.name, task.seed).with_suffix(".log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _drain(self, ready: deque) -> None:
        if self.jobs == 1:
            while ready:
                task = ready.popleft()
                start = time.perf_counter()
                result = execute_in_process(
                    self.config_for(task).to_dict(), self._log_path(task), task.key in self._resume
                )
                self._record(task, result, time.perf_counter() - start)
                self._release(task, ready)
            return
        running: dict[Future, tuple[Task, float]] = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while ready or running:
                while ready and len(running) < self.jobs:
                    task = ready.popleft()
                    cfg = self.config_for(task).to_dict()
                    future = pool.submit(
                        execute_subprocess, cfg, self._log_path(task), self.threads, task.key in self._resume
                    )
                    running[future] = (task, time.perf_counter())
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task, start = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # the launcher itself failed
                        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    self._record(task, result, time.perf_counter() - start)
                    self._release(task, ready)

    # -- the table -----------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """The table from the runs that have finished so far; runs nothing (``--table-only``)."""
        for seed in self.plan.seeds:
            for arm in self.plan.arms:
                tasks = [Task(arm, seed)]
                if self.plan.matched and arm.role == "arm" and arm.varies_lambda():
                    tasks.append(Task(self.matched_arm(arm), seed))
                if arm.name in self.timed_arms:
                    tasks.append(Task(self.timed_arms[arm.name], seed))
                for task in tasks:
                    run_dir = run_dir_for(self.out_dir, task.arm.name, task.seed)
                    summary = RunSummary.read(run_dir)
                    if summary is not None:
                        self.outcomes[task.key] = RunOutcome(
                            task.arm.name, task.seed, "ok", str(run_dir), summary, reused=True
                        )
        self.teacher.update(describe_models(self.plan))
        return self.finish(table_only=True)

    def planned_runs(self) -> int:
        matched = len(self.plan.reliance_arms()) if self.plan.matched else 0
        return (len(self.plan.arms) + matched + len(self.plan.timed_arms())) * len(self.plan.seeds)

    def finish(self, *, table_only: bool) -> dict[str, Any]:
        """Write comparison.json, comparison.md and the plots from the outcomes so far."""
        derived = [*self.matched_arms.values(), *self.timed_arms.values()]
        data = summarise(self.plan, derived, self.outcomes, self.teacher)
        data["output_dir"] = str(self.out_dir)
        data["runs_planned"] = self.planned_runs()
        data["runs_finished"] = sum(o.status == "ok" for o in self.outcomes.values())
        if table_only:
            data["table_only"] = True
        else:
            data["wall_seconds"] = time.perf_counter() - (self.started or time.perf_counter())
            data["jobs"] = self.jobs
        atomic_write_json(self.out_dir / "comparison.json", data)
        atomic_write_text(self.out_dir / "comparison.md", render_markdown(data))
        try:
            write_comparison_plots(self.out_dir, data)
        except Exception as exc:  # plots never lose the table
            self.log(f"plots failed: {exc}")
        return data


def equal_time_steps(reference: RunSummary, arm: RunSummary) -> int:
    """The steps of ``arm``'s strategy that take ``reference``'s training time (eval and checkpoints left out,
    generation included), at the time per step ``arm``'s run measured."""
    return max(1, round(train_seconds(reference) / (train_seconds(arm) / arm.steps)))
