"""A GPU check in one command: kdcore's KD step on a GPU-sized pair, tokens/s and peak memory as one table.

    python bench/gpu_check.py                        # CUDA, bf16: SmolLM2-135M-Instruct → its 6-layer cut, 16 × 512
    python bench/gpu_check.py --teacher FILE.gguf    # the same teacher from a local directory or GGUF file
    python bench/gpu_check.py --cpu-smoke            # seconds on CPU: a tiny pair, every arm once (in the test suite)

Step arms, each trained for ``--steps`` timed optimizer steps after ``--warmup``, in interleaved rounds
(A B C ... A B C ...), same student initialisation, data, batch and optimizer (AdamW, lr 3e-3):

- ``kdcore-fused``: the engine with the live teacher, the fused LM-head loss (``training.loss_path: fused``);
- ``kdcore-logits``: the same on full logits (``training.loss_path: logits``);
- ``kdcore-prefetch``: ``kdcore-fused`` with ``training.teacher_prefetch`` (the teacher's pass on the next
  batch in a background thread, on a CUDA stream of its own);
- ``kdcore-cache``: the same from a top-64 teacher cache (``kd run --teacher-cache``), no teacher model
  (the student's fused loss against the cache's top-K);
- ``ce``: the student alone (``reliance: none``), the floor;
- ``trl-gkd``: TRL's GKDTrainer, off-policy forward KL (``bench/peers.py``), when ``trl`` is installed.

kdcore's arms use ``training.mixed_precision: bf16`` (``--precision``), TRL its own bf16 autocast.
Peak memory: ``torch.cuda.max_memory_allocated`` during an arm's steps minus what was allocated when
they began (models stay resident: only what a step adds is compared). The loss-level rows run one
forward + backward of the KD loss alone on random hidden states (``bench/fused_loss_memory.py``'s
variants) at the teacher's vocabulary with N = batch × seq tokens. On CPU (``--cpu-smoke``) memory
columns say ``n/a``: the smoke run checks that every path runs, not its figures (in bf16 under CPU
autocast, so the mixed-precision code paths run too).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch

HUB_TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOP_K = 64
LOSS_VARIANTS = ("ce-fused", "kd-fused", "kd-naive")


def cuda_peak_start() -> float:
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def cuda_peak_since(base: float) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20 - base


def build(args: argparse.Namespace) -> tuple[C.Setup, torch.nn.Module]:
    """The data, the teacher and the cut student every arm starts from (a copy each)."""
    from kdcore.inputs.cut import cut_student, parse_cut_spec

    if args.cpu_smoke:
        s = C.setup(quick=True, threads=1)
        return s, cut_student(s.teacher, parse_cut_spec("from-teacher:num_layers=1"))
    from kdcore.config import DataConfig
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import load_pretrained, load_tokenizer, quiet_transformers

    quiet_transformers()
    teacher = load_pretrained(args.teacher, echo=print).to("cuda").eval()
    tokenizer = load_tokenizer(args.teacher)
    data = DataConfig(dataset=args.dataset, seq_len=args.seq_len, max_eval_samples=args.batch_size)
    train, eval_set = load_corpus(data, 0).pack(tokenizer, args.seq_len)
    samples = args.batch_size * (args.warmup + args.steps) * args.rounds
    s = C.Setup(
        tokenizer, train.head(samples), eval_set, teacher, "", args.teacher, args.batch_size, args.seq_len
    )
    return s, cut_student(teacher, parse_cut_spec(f"from-teacher:num_layers={args.layers}"))


def engine_arm(s: C.Setup, student: torch.nn.Module, precision: str, **kwargs):
    """A callable doing one engine step (returns its trained tokens)."""
    t = C.trainer(s, student_model=copy.deepcopy(student), mixed_precision=precision, **kwargs)
    return lambda: C.engine_step(t)


def time_steps(fn, steps: int) -> tuple[list[float], list[float], float | None]:
    base = cuda_peak_start()
    times, tokens = [], []
    for _ in range(steps):
        start = time.perf_counter()
        tokens.append(fn())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, tokens, cuda_peak_since(base)


def loss_rows(vocab: int, tokens: int, hidden: int) -> dict[str, float | None]:
    """Peak memory of one forward + backward of each loss variant alone (random inputs)."""
    from fused_loss_memory import random_inputs, step

    from kdcore.plugins import get_registry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    divergence = get_registry().create("divergence", "forward-kl", {})
    out = {}
    for variant in LOSS_VARIANTS:
        x = {key: value.to(device) for key, value in random_inputs(vocab, tokens, hidden).items()}
        x["h"].requires_grad_(True)
        x["w"].requires_grad_(True)
        base = cuda_peak_start()
        with torch.autocast(device, dtype=torch.bfloat16):
            step(variant, x, divergence)
        out[variant] = cuda_peak_since(base)
        del x
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny pair on CPU, every arm once")
    parser.add_argument("--teacher", default=HUB_TEACHER, help="hub id, directory or .gguf file")
    parser.add_argument("--dataset", default="demo", help="training text, as for kd run")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of the student cut")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arm even if trl is installed")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.rounds, args.precision = 1, 0, 1, "bf16"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on CPU")
    from kdcore.teachers.cache import TeacherCache, write_cache

    s, student = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, Path(tmp) / "cache", top_k=TOP_K)
        cache = TeacherCache.open(Path(tmp) / "cache")
        arms = {
            "kdcore-fused": engine_arm(s, student, args.precision, teacher=s.teacher, loss_path="fused"),
            "kdcore-logits": engine_arm(s, student, args.precision, teacher=s.teacher, loss_path="logits"),
            "kdcore-prefetch": engine_arm(
                s, student, args.precision, teacher=s.teacher, loss_path="fused", teacher_prefetch=True
            ),
            "kdcore-cache": engine_arm(s, student, args.precision, cache=cache),
            "ce": engine_arm(s, student, args.precision, reliance="none"),
        }
        trl = not args.no_trl
        try:
            import trl as _
        except ImportError:
            trl = False
            print("trl-gkd skipped: trl is not installed (pip install -e '.[bench]')")
        times: dict[str, list[float]] = {name: [] for name in [*arms, *(["trl-gkd"] if trl else [])]}
        tokens: dict[str, list[float]] = {name: [] for name in times}
        peaks: dict[str, list[float | None]] = {name: [] for name in times}
        for fn in arms.values():
            for _ in range(args.warmup):
                fn()
        for _ in range(args.rounds):
            for name, fn in arms.items():
                t, n, peak = time_steps(fn, args.steps)
                times[name] += t
                tokens[name] += n
                peaks[name].append(peak)
            if trl:
                import peers

                base = cuda_peak_start()
                gpu = {"use_cpu": not torch.cuda.is_available(), "bf16": args.precision == "bf16"}
                t, n = peers.run_gkd(
                    s, args.steps, args.warmup, f"{tmp}/trl", student=copy.deepcopy(student), **gpu
                )
                times["trl-gkd"] += t
                tokens["trl-gkd"] += n
                peaks["trl-gkd"].append(cuda_peak_since(base))
    losses = loss_rows(len(s.tokenizer), args.batch_size * args.seq_len, s.teacher.config.hidden_size)

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run: figures mean nothing)"
    )
    print(f"device: {device}; teacher {s.teacher_spec}, batch {s.batch_size} × {s.seq_len}, {args.precision}")

    def mib(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{max(known):9.0f} MiB" if known else "      n/a"

    rate = {}
    print(f"{'arm':<16} {'s/step':>8} {'tokens/s':>10} {'peak step memory':>18}")
    for name in times:
        rate[name] = statistics.fmean(tokens[name]) / statistics.median(times[name])
        print(f"{name:<16} {statistics.median(times[name]):8.3f} {rate[name]:10.0f} {mib(peaks[name]):>18}")
    for name, peak in losses.items():
        print(f"loss {name:<11} {'':>8} {'':>10} {mib([peak]):>18}")
    for ours in ("kdcore-fused", "kdcore-cache"):
        for other in ("ce", "trl-gkd"):
            if other in rate:
                print(f"ratio {ours}/{other} tokens/s = {rate[ours] / rate[other]:.3f}")
    if losses["kd-fused"] is not None:
        print(f"ratio loss kd-fused/ce-fused peak memory = {losses['kd-fused'] / losses['ce-fused']:.3f}")
        print(f"ratio loss kd-naive/kd-fused peak memory = {losses['kd-naive'] / losses['kd-fused']:.3f}")


if __name__ == "__main__":
    main()
