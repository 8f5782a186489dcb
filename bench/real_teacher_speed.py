"""Training throughput and peak memory with a real teacher: SmolLM2-135M-Instruct into a 4-layer cut of it.

Teacher: SmolLM2-135M-Instruct from its GGUF file (30 layers, vocabulary 49,152); student:
``from-teacher:num_layers=4`` (teacher layers 0, 10, 19, 29, with its embeddings, norm and head);
data: tinyshakespeare packed into samples of 256 tokens (the first ``--samples`` of them), batch 8,
AdamW lr 3e-3 for every arm. Arms, each in a fresh process per round (so that each has its own peak):

- ``kdcore``: the engine with the live teacher, ``0.5·CE + 0.5·τ²·KL(P_T‖P_S)``, τ = 2 (the fused
  LM-head loss: both heads are linear);
- ``kdcore-cache``: the same from a top-64 teacher cache (``kd run --teacher-cache``), no teacher model;
- ``hf-trainer``: a ``transformers.Trainer`` subclass computing the same objective the plain way
  (``bench/peers.py``);
- ``trl-gkd``: TRL's ``GKDTrainer``, off-policy forward KL (``bench/peers.py``), when ``trl`` is
  installed (``pip install -e '.[bench]'``), with its defaults: bf16 autocast (on a CPU with bf16
  instructions too) and gradient checkpointing;
- ``trl-gkd-fp32``: the same in float32 without gradient checkpointing, as the other arms run.

Tokens/s: labelled tokens over the median time between optimizer steps, after ``--warmup`` steps.
Peak RSS: the process's resident-memory peak (Linux ``VmHWM``) from the end of set-up (models loaded,
data packed, the teacher freed in the cache arm) to the end of training; it includes the models.
Rounds interleave the arms (A B C D A B C D ...) so load from other processes hits them alike.

Run: ``python bench/real_teacher_speed.py --threads 1`` (needs the GGUF file, see docs/real-models.md,
and ``../shared/data``; minutes per round on 2 CPU cores).
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

ARMS = ("kdcore", "kdcore-cache", "hf-trainer", "trl-gkd", "trl-gkd-fp32")
#: GKDConfig defaults to bf16 autocast and gradient checkpointing; this arm runs it in float32 without
#: checkpointing, as every other arm runs.
FP32 = {"bf16": False, "gradient_checkpointing": False}
STUDENT = "from-teacher:num_layers=4"
SEQ_LEN, BATCH, TOP_K = 256, 8, 64


def setup(samples: int, threads: int) -> C.Setup:
    """The teacher and the first ``samples`` packed samples of tinyshakespeare, as every arm sees them."""
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


def worker(arm: str, cache_dir: str, threads: int, samples: int, steps: int, warmup: int) -> dict:
    """One arm: set up, reset the peak, train ``warmup + steps`` steps; step times, tokens and peak."""
    import peers

    from kdcore.inputs.cut import cut_student, parse_cut_spec

    s = setup(samples, threads)
    student = cut_student(s.teacher, parse_cut_spec(STUDENT))
    cache = None
    if arm == "kdcore-cache":
        from kdcore.teachers.cache import TeacherCache

        cache = TeacherCache.open(Path(cache_dir))
        s.teacher = None
    gc.collect()
    reset_peak()
    if arm in ("kdcore", "kdcore-cache"):
        t = C.trainer(s, teacher=s.teacher, cache=cache, student_model=student)
        times, tokens = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            n = C.engine_step(t)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                tokens.append(n)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if arm == "hf-trainer":
                times, tokens = peers.run_hf(s, steps, warmup, tmp, student=student)
            else:
                config = FP32 if arm == "trl-gkd-fp32" else {}
                times, tokens = peers.run_gkd(s, steps, warmup, tmp, student=student, **config)
    return {"times": times, "tokens": tokens, "peak_mib": peak_mib()}


def build_cache(directory: Path, samples: int, threads: int) -> None:
    from kdcore.teachers.cache import write_cache

    s = setup(samples, threads)
    write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, directory, top_k=TOP_K, batch_size=BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm and round (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--samples", type=int, default=24, help="training samples, cached for the cache arm")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arm even if trl is installed")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arm, cache_dir = args.worker
        result = worker(arm, cache_dir, args.threads, args.samples, args.steps, args.warmup)
        print("RESULT " + json.dumps(result))
        return
    if not (SMOLLM2 / SMOLLM2_FILE).is_file() or not SHAKESPEARE.is_file():
        raise SystemExit(f"needs {SMOLLM2 / SMOLLM2_FILE} (docs/real-models.md) and {SHAKESPEARE}")
    arms = list(ARMS)
    try:
        if args.no_trl:
            raise ImportError("--no-trl")
        import trl  # noqa: F401
    except ImportError as exc:
        arms = [arm for arm in arms if not arm.startswith("trl")]
        print(f"trl arm skipped: {exc} (pip install -e '.[bench]')")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        build_cache(Path(tmp) / "k64", args.samples, args.threads)
        for _ in range(args.rounds):
            for arm in arms:
                common = ["--threads", str(args.threads), "--samples", str(args.samples)]
                common += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                cmd = [sys.executable, __file__, "--worker", arm, str(Path(tmp) / "k64"), *common]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
                results[arm].append(json.loads(lines[-1][len("RESULT ") :]))
                print(f"round {len(results[arm])} {arm}: {json.dumps(results[arm][-1])}", flush=True)

    print(f"machine: {C.machine()}")
    print(
        f"teacher SmolLM2-135M-Instruct (GGUF), student {STUDENT}, batch {BATCH} x {SEQ_LEN}, "
        f"{args.threads} thread(s); {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.rounds} interleaved rounds per arm"
    )
    rate, peak = {}, {}
    for arm, runs in results.items():
        times = [x for r in runs for x in r["times"]]
        tokens = [x for r in runs for x in r["tokens"]]
        rate[arm] = statistics.fmean(tokens) / statistics.median(times)
        peak[arm] = statistics.median(r["peak_mib"] for r in runs)
        print(
            f"  {arm:<13} median {statistics.median(times):7.2f} s/step  {rate[arm]:8.0f} tokens/s  "
            f"peak RSS {peak[arm]:7.0f} MiB"
        )
    for ours in ("kdcore", "kdcore-cache"):
        for peer in ("hf-trainer", "trl-gkd", "trl-gkd-fp32"):
            if peer in rate:
                print(
                    f"ratio {ours}/{peer} tokens/s = {rate[ours] / rate[peer]:.3f}, "
                    f"peak RSS = {peak[ours] / peak[peer]:.3f}"
                )
    print(f"ratio kdcore-cache/kdcore tokens/s = {rate['kdcore-cache'] / rate['kdcore']:.3f}")


if __name__ == "__main__":
    main()
