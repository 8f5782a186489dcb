"""Training throughput and peak memory with a real teacher: SmolLM2-135M-Instruct into a 4-layer cut of it.

Teacher: SmolLM2-135M-Instruct from its GGUF file (30 layers, vocabulary 49,152); student:
``from-teacher:num_layers=4`` (teacher layers 0, 10, 19, 29, with its embeddings, norm and head);
data: tinyshakespeare packed into samples of 256 tokens (the first ``--samples`` of them), batch 8,
AdamW lr 3e-3 for every arm. Arms, each in a fresh process per round and thread count (so that each has its own peak):

- ``kdcore``: the engine with the live teacher, ``0.5·CE + 0.5·τ²·KL(P_T‖P_S)``, τ = 2 (the fused
  LM-head loss: both heads are linear), float32;
- ``kdcore-bf16``: the same with ``training.mixed_precision: bf16`` (student, teacher and the fused loss's
  head projections under bf16 autocast, the loss summed in float32);
- ``kdcore-prefetch``: float32 with ``training.teacher_prefetch: true`` (the teacher's pass on the next
  batch in a background thread during the student's step; the threads split between the two);
- ``kdcore-bf16-prefetch``: both;
- ``kdcore-cache-fused``: from a top-64 teacher cache (``kd run --teacher-cache``), no teacher model, the
  student's fused loss against the cache's top-K (what ``loss_path: auto`` takes);
- ``kdcore-cache-logits``: the same cache on the logits path (full student logits);
- ``hf-trainer``: a ``transformers.Trainer`` subclass computing the same objective the plain way
  (``bench/peers.py``);
- ``trl-gkd``: TRL's ``GKDTrainer``, off-policy forward KL (``bench/peers.py``), when ``trl`` is
  installed (``pip install -e '.[bench]'``), with its defaults: bf16 autocast (on a CPU with bf16
  instructions too) and gradient checkpointing;
- ``trl-gkd-fp32``: the same in float32 without gradient checkpointing, as the other arms run.

Every arm runs at each of ``--threads`` (default ``1,2``: torch intra-op threads, and
``OMP_NUM_THREADS``). Tokens/s: labelled tokens over the median time between optimizer steps, after
``--warmup`` steps. Peak RSS: the process's resident-memory peak (Linux ``VmHWM``) from the end of
set-up (models loaded, data packed, the teacher freed in the cache arms) to the end of training; it
includes the models. Rounds interleave the arms (A B C D A B C D ...) so load from other processes
hits them alike. One table: every arm and thread count, its tokens/s and peak RSS as ratios to TRL's
defaults at the same thread count (``trl-gkd``; ``hf-trainer`` when ``trl`` is not installed).

Run: ``python bench/real_teacher_speed.py`` (needs the GGUF file, see docs/real-models.md, and
``../shared/data``; minutes per round on 2 CPU cores). ``--quick``: a tiny random pair on the demo
data (seconds; the test suite's check that every arm runs, its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch
from fused_loss_memory import SHAKESPEARE, SMOLLM2, SMOLLM2_FILE, peak_mib, reset_peak

#: kdcore's arms: TrainingConfig fields, and whether the arm trains from the teacher cache
KDCORE = {
    "kdcore": ({}, False),
    "kdcore-bf16": ({"mixed_precision": "bf16"}, False),
    "kdcore-prefetch": ({"teacher_prefetch": True}, False),
    "kdcore-bf16-prefetch": ({"mixed_precision": "bf16", "teacher_prefetch": True}, False),
    "kdcore-cache-fused": ({"loss_path": "fused"}, True),
    "kdcore-cache-logits": ({"loss_path": "logits"}, True),
}
ARMS = (*KDCORE, "hf-trainer", "trl-gkd", "trl-gkd-fp32")
#: GKDConfig defaults to bf16 autocast and gradient checkpointing; this arm runs it in float32 without
#: checkpointing, as every other arm runs.
FP32 = {"bf16": False, "gradient_checkpointing": False}
STUDENT = "from-teacher:num_layers=4"
QUICK_STUDENT = "from-teacher:num_layers=1"
SEQ_LEN, BATCH, TOP_K = 256, 8, 64


def setup(samples: int, threads: int, quick: bool = False) -> C.Setup:
    """The teacher and the first ``samples`` packed samples of tinyshakespeare, as every arm sees them
    (``quick``: bench/_common.py's tiny random teacher on the demo data)."""
    if quick:
        s = C.setup(quick=True, threads=threads)
        s.train = s.train.head(samples)
        return s
    from kdcore.config import DataConfig
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import load_pretrained, load_tokenizer, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(threads)
    source = str(SMOLLM2 / SMOLLM2_FILE)
    teacher = load_pretrained(source, echo=print).eval()
    tokenizer = load_tokenizer(source)
    data = DataConfig(dataset=str(SHAKESPEARE), seq_len=SEQ_LEN, max_eval_samples=BATCH)
    train, eval_set = load_corpus(data, 0).pack(tokenizer, SEQ_LEN)
    return C.Setup(tokenizer, train.head(samples), eval_set, teacher, STUDENT, SMOLLM2_FILE, BATCH, SEQ_LEN)


def worker(
    arm: str, cache_dir: str, threads: int, samples: int, steps: int, warmup: int, quick: bool = False
) -> dict:
    """One arm: set up, reset the peak, train ``warmup + steps`` steps; step times, tokens and peak."""
    import peers

    from kdcore.inputs.cut import cut_student, parse_cut_spec

    s = setup(samples, threads, quick)
    student = cut_student(s.teacher, parse_cut_spec(QUICK_STUDENT if quick else STUDENT))
    cache = None
    fields, cached = KDCORE.get(arm, ({}, False))
    if cached:
        from kdcore.teachers.cache import TeacherCache

        cache = TeacherCache.open(Path(cache_dir))
        s.teacher = None
    gc.collect()
    reset_peak()
    if arm in KDCORE:
        t = C.trainer(s, teacher=s.teacher, cache=cache, student_model=student, **fields)
        times, tokens = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            n = C.engine_step(t)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                tokens.append(n)
        t.close()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if arm == "hf-trainer":
                times, tokens = peers.run_hf(s, steps, warmup, tmp, student=student)
            else:
                config = FP32 if arm == "trl-gkd-fp32" else {}
                times, tokens = peers.run_gkd(s, steps, warmup, tmp, student=student, **config)
    return {"times": times, "tokens": tokens, "peak_mib": peak_mib()}


def build_cache(directory: Path, samples: int, threads: int, quick: bool = False) -> None:
    from kdcore.teachers.cache import write_cache

    s = setup(samples, threads, quick)
    write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, directory, top_k=TOP_K, batch_size=BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", default="1,2", help="torch threads, a comma-separated list (default 1,2)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm and round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--samples", type=int, default=24, help="training samples, cached for the cache arms")
    parser.add_argument("--arms", help="a comma-separated subset of the arms (default all)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arms even if trl is installed")
    parser.add_argument("--quick", action="store_true", help="a tiny random pair: checks that every arm runs")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = [int(x) for x in str(args.threads).split(",") if x.strip()]
    if args.quick:
        args.rounds, args.steps, args.warmup, args.samples = 1, 1, 1, 32
    if args.worker:
        arm, cache_dir = args.worker
        result = worker(arm, cache_dir, threads[0], args.samples, args.steps, args.warmup, args.quick)
        print("RESULT " + json.dumps(result))
        return
    if not args.quick and (not (SMOLLM2 / SMOLLM2_FILE).is_file() or not SHAKESPEARE.is_file()):
        raise SystemExit(f"needs {SMOLLM2 / SMOLLM2_FILE} (docs/real-models.md) and {SHAKESPEARE}")
    arms = list(ARMS) if not args.arms else [a.strip() for a in args.arms.split(",")]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    try:
        if args.no_trl:
            raise ImportError("--no-trl")
        import trl  # noqa: F401
    except ImportError as exc:
        arms = [arm for arm in arms if not arm.startswith("trl")]
        print(f"trl arms skipped: {exc} (pip install -e '.[bench]')")
    results: dict[tuple[str, int], list[dict]] = {(arm, n): [] for n in threads for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        if any(KDCORE.get(arm, ({}, False))[1] for arm in arms):
            build_cache(Path(tmp) / "k64", args.samples, threads[0], args.quick)
        for _ in range(args.rounds):
            for arm, n in results:
                env = {**os.environ, "OMP_NUM_THREADS": str(n), "PYTHONWARNINGS": "ignore"}
                common = ["--threads", str(n), "--samples", str(args.samples)]
                common += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                common += ["--quick"] if args.quick else []
                cmd = [sys.executable, __file__, "--worker", arm, str(Path(tmp) / "k64"), *common]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{arm} ({n} threads) failed:\n{done.stderr[-3000:]}")
                results[(arm, n)].append(json.loads(lines[-1][len("RESULT ") :]))
                print(
                    f"round {len(results[(arm, n)])} {arm} {n} thread(s): {json.dumps(results[(arm, n)][-1])}",
                    flush=True,
                )

    print(f"machine: {C.machine()}")
    pair = (
        "tiny random pair (--quick: figures mean nothing)"
        if args.quick
        else (f"teacher SmolLM2-135M-Instruct (GGUF), student {STUDENT}")
    )
    print(
        f"{pair}, batch {BATCH if not args.quick else C.QUICK['batch_size']} x "
        f"{SEQ_LEN if not args.quick else C.QUICK['seq_len']}; {args.steps} timed steps after "
        f"{args.warmup} warm-up, {args.rounds} interleaved rounds per arm"
    )
    rate, peak, median = {}, {}, {}
    for key, runs in results.items():
        times = [x for r in runs for x in r["times"]]
        tokens = [x for r in runs for x in r["tokens"]]
        median[key] = statistics.median(times)
        rate[key] = statistics.fmean(tokens) / median[key]
        peak[key] = statistics.median(r["peak_mib"] for r in runs)
    reference = "trl-gkd" if "trl-gkd" in arms else "hf-trainer" if "hf-trainer" in arms else arms[0]
    print(f"ratios: to {reference} at the same thread count")
    header = f"{'arm':<21} {'threads':>7} {'s/step':>8} {'tokens/s':>9} {'peak RSS':>10} {'x tokens/s':>10} {'x RSS':>6}"
    print(header)
    for arm, n in results:
        ref = (reference, n)
        print(
            f"{arm:<21} {n:>7} {median[(arm, n)]:8.3f} {rate[(arm, n)]:9.0f} {peak[(arm, n)]:6.0f} MiB "
            f"{rate[(arm, n)] / rate[ref]:10.3f} {peak[(arm, n)] / peak[ref]:6.3f}"
        )
    for n in threads:
        for arm in arms:
            if arm != reference:
                print(
                    f"ratio {arm}/{reference} at {n} thread(s) tokens/s = "
                    f"{rate[(arm, n)] / rate[(reference, n)]:.3f}, peak RSS = {peak[(arm, n)] / peak[(reference, n)]:.3f}"
                )


if __name__ == "__main__":
    main()
