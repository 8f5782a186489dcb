"""Cost per step of the student-snapshot scorer and of the curriculum sampler (should be noise).

Two measurements, in one process:

1. Engine steps (live teacher, fixed λ = 0.5), interleaved rounds, three arms: ``plain`` (no
   scorer, no pacing), ``snapshot`` (the student-snapshot scorer observes every micro-batch) and
   ``curriculum`` (student-snapshot + root pacing: the sampler draws from the open share and
   re-sorts every epoch). Ratios of median step time to ``plain``.
2. The strategy calls alone, timed directly: ``scorer.observe`` on one batch's statistics,
   ``sampler.batch``, ``sampler.refresh`` (once per epoch; shown per step) and the reliance
   policy's ``weights``; their sum as a share of the plain step time.

Run: ``python bench/overhead.py`` or ``--quick``.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import torch


def per_call(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps; seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    s = C.setup(args.quick, "byte", args.threads)

    trainers = {
        "plain": C.trainer(s, teacher=s.teacher),
        "snapshot": C.trainer(s, teacher=s.teacher, scorer="student-snapshot"),
        "curriculum": C.trainer(s, teacher=s.teacher, scorer="student-snapshot", pacing="root"),
    }
    arms = {name: (lambda t=t: C.engine_step(t)) for name, t in trainers.items()}
    results = C.interleave(arms, steps, rounds, warmup=1 if args.quick else 3)

    # the strategy calls alone, on the curriculum trainer's real state
    t = trainers["curriculum"]
    b = s.batch_size
    ids = t.sampler.batch(5)
    stats = {k: torch.rand(b) for k in ("ce", "kd", "confidence", "tokens")}
    repeat = 20 if args.quick else 500
    calls = {
        "scorer.observe": per_call(lambda: t.strategies.scorer.observe(ids, stats), repeat),
        "sampler.batch": per_call(lambda: t.sampler.batch(7), repeat),
        "sampler.refresh/step": per_call(
            lambda: t.sampler.refresh(t.strategies.scorer.scores(), 0), max(2, repeat // 20)
        )
        / t.sampler.steps_per_epoch,
        "reliance.weights": per_call(
            lambda: t.strategies.reliance.weights(t.sampler.ranks[ids], t.sampler.scores[ids], 0.5), repeat
        ),
    }

    print(f"machine: {C.machine()}")
    print(
        f"models: teacher {s.teacher_spec}, student {s.student_spec}, batch {b} x seq {s.seq_len}, "
        f"{len(s.train)} samples; {steps} steps x {rounds} rounds per arm"
    )
    for name, r in results.items():
        print(f"  {name:<11} median {r['median_s'] * 1e3:8.2f} ms/step")
    plain = results["plain"]["median_s"]
    for name, seconds in calls.items():
        print(f"  {name:<21} {seconds * 1e6:9.1f} µs/step")
    print(f"ratio snapshot/plain step time = {results['snapshot']['median_s'] / plain:.3f}")
    print(f"ratio curriculum/plain step time = {results['curriculum']['median_s'] / plain:.3f}")
    print(f"ratio strategy calls/plain step time = {sum(calls.values()) / plain:.4f}")


if __name__ == "__main__":
    main()
