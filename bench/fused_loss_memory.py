"""Peak memory and time of the KD loss from hidden states: fused LM head vs full logits.

Each variant runs in a fresh subprocess, once per round. The figure is the peak resident memory
of that process during one forward + backward of the loss (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs are built, so the temporaries of building them do not
count) minus its RSS at that moment, i.e. what the loss adds. Resident memory rather than
torch's own allocation counters: on CPU every tensor is a malloc'ed block, and RSS is what the
machine runs out of (and it includes the allocator's own retention, see docs/performance.md on
glibc); the processes run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the
system and the peak is the live tensors'. Inputs (as the engine would hand them over): the
student's final hidden states ``[N, H]`` (requiring grad) and LM head ``[V, H]`` (trainable, its
``.grad`` buffer already allocated as in training), the teacher's hidden states ``[N, H]`` and
head ``[V, H]`` (frozen), labels; 0.5·CE + 0.5·τ²·KL (forward KL, τ = 2).

- ``ce-fused``: CE alone on the fused path (``fused_sample_terms`` without a teacher);
- ``kd-fused``: the fused KD loss, loss weights announced (gradients computed in the forward pass);
- ``kd-fused-recompute``: the same without announced weights (each chunk projected again in backward);
- ``kd-chunked``: full logits of both models, then ``kdcore.training.losses.per_sample_terms`` (today's engine);
- ``kd-naive``: full logits, ``log_softmax`` of both, ``F.kl_div`` and ``F.cross_entropy``, whole.

Run: ``python bench/fused_loss_memory.py`` (V = 131,072 and 49,152, N = 4096, H = 576; minutes
and ~15 GiB for the naive variant at 128k), ``--real`` (V = 49,152 from SmolLM2-135M-Instruct: its
head and final hidden states on tinyshakespeare, the student a 4-layer cut of it; needs the GGUF
file and ``../shared``), or ``--quick`` (V = 8192, N = 512; seconds). Prints a ``ratio`` line per
vocabulary size: memory and time of each variant relative to ``ce-fused`` and ``kd-naive``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ce-fused", "kd-fused", "kd-fused-recompute", "kd-chunked", "kd-naive")
TAU = 2.0
SMOLLM2 = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdcore-test-models"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def peak_mib() -> float:
    """The process's peak RSS since the last :func:`reset_peak` (Linux ``VmHWM``), else since it started."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak() -> None:
    """Forget the peak reached while the inputs were built (temporaries, copies): Linux ``clear_refs`` 5."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def current_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_inputs(vocab: int, tokens: int, hidden: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(tokens, hidden, generator=g),
        "w": torch.randn(vocab, hidden, generator=g) * hidden**-0.5,
        "th": torch.randn(tokens, hidden, generator=g),
        "tw": torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 2,
        "labels": torch.randint(0, vocab, (tokens,), generator=g),
    }


def step(variant: str, x: dict, div, chunk: int | None = None) -> float:
    """One forward + backward of ``variant``; returns the loss value."""
    import torch
    import torch.nn.functional as F

    from kdcore.training.fused_loss import fused_sample_terms
    from kdcore.training.losses import per_sample_terms

    h, w, th, tw, labels = x["h"], x["w"], x["th"], x["tw"], x["labels"]
    n = h.shape[0]
    half = torch.full((1,), 0.5, device=h.device)
    if variant in ("ce-fused", "kd-fused", "kd-fused-recompute"):
        teacher = () if variant == "ce-fused" else (th[None], tw, div, TAU)
        weights = None if variant == "kd-fused-recompute" else (half, half)
        terms = fused_sample_terms(
            h[None], w, labels[None], *teacher, loss_weights=weights, chunk_tokens=chunk
        )
        loss = 0.5 * terms.ce + 0.5 * terms.kd
    elif variant == "kd-chunked":
        with torch.no_grad():
            t = th @ tw.T
        terms = per_sample_terms((h @ w.T)[None], labels[None], t[None], div, TAU)
        loss = 0.5 * terms.ce + 0.5 * terms.kd
    elif variant == "kd-naive":
        s = h @ w.T
        with torch.no_grad():
            t = th @ tw.T
        s_logp, t_logp = F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1)
        kd = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True) * TAU**2 / n
        loss = 0.5 * kd + 0.5 * F.cross_entropy(s, labels)
    else:
        raise SystemExit(f"unknown variant {variant}")
    loss.sum().backward()
    return float(loss.sum().detach())


def worker(variant: str, source: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    import torch

    from kdcore.plugins import get_registry

    torch.set_num_threads(1)
    div = get_registry().create("divergence", "forward-kl", {})
    warm = random_inputs(64, 16, 8)
    for key in ("h", "w"):
        warm[key].requires_grad_(True)
    step(variant, warm, div)  # lazy imports and allocator set-up stay out of the figure
    if source == "random":
        x = random_inputs(vocab, tokens, hidden)
    else:
        from safetensors.torch import load_file

        x = {k: v.clone() for k, v in load_file(source).items()}
    x["h"].requires_grad_(True)
    x["w"].requires_grad_(True)
    x["w"].grad = torch.zeros_like(x["w"])  # the parameter's gradient buffer exists in training anyway
    base = current_mib()
    reset_peak()
    start = time.perf_counter()
    loss = step(variant, x, div, chunk or None)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "peak_mib": peak_mib() - base,
        "seconds": seconds,
        "loss": loss,
        "grad_w": float(x["w"].grad.norm()),
        "grad_h": float(x["h"].grad.norm()),
    }


def real_inputs(path: Path, tokens: int) -> int:
    """SmolLM2's head and final hidden states (teacher, and a 4-layer cut student) on tinyshakespeare."""
    import torch
    from safetensors.torch import save_file

    from kdcore.inputs.cut import cut_student, parse_cut_spec
    from kdcore.inputs.gguf import load_gguf
    from kdcore.training.fused_loss import final_hidden_states, linear_head

    torch.set_num_threads(1)
    teacher, tokenizer = load_gguf(str(SMOLLM2 / SMOLLM2_FILE), echo=print)
    student = cut_student(teacher, parse_cut_spec("from-teacher:num_layers=4")).eval()
    text = SHAKESPEARE.read_text()
    ids = torch.tensor(tokenizer(text[: tokens * 8], add_special_tokens=False).input_ids[: tokens + 1])
    if ids.numel() < tokens + 1:
        raise SystemExit(f"tinyshakespeare gave {ids.numel()} tokens, fewer than {tokens + 1}")
    inputs, labels = ids[:-1].view(8, -1), ids[1:]
    mask = torch.ones_like(inputs)
    with torch.inference_mode():
        th = torch.cat(
            [final_hidden_states(teacher, inputs[i : i + 1], mask[i : i + 1])[0] for i in range(8)]
        )
        h = torch.cat([final_hidden_states(student, inputs[i : i + 1], mask[i : i + 1])[0] for i in range(8)])
    save_file(
        {
            "h": h.contiguous(),
            "w": linear_head(student)[0].detach().clone(),
            "th": th.contiguous(),
            "tw": linear_head(teacher)[0].detach().clone(),
            "labels": labels.contiguous(),
        },
        str(path),
    )
    return int(teacher.config.vocab_size)


def measure(variant: str, source: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, source, *map(str, (vocab, tokens, hidden, chunk))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} V={vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(vocab: int, label: str, runs: dict[str, list[dict]]) -> None:
    peak = {v: statistics.median(r["peak_mib"] for r in rs) for v, rs in runs.items()}
    secs = {v: statistics.median(r["seconds"] for r in rs) for v, rs in runs.items()}
    for v in runs:
        r = runs[v][0]
        print(
            f"  V={vocab:>6} {v:<19} peak {peak[v]:9.1f} MiB  {secs[v]:7.2f} s  loss {r['loss']:.5f}  "
            f"|grad W| {r['grad_w']:.5f}  |grad h| {r['grad_h']:.5f}"
        )
    kd = [runs[v][0] for v in runs if v.startswith("kd-")] or [runs[v][0] for v in runs]
    for key in ("loss", "grad_w", "grad_h"):  # every KD variant computes the same thing
        values = [r[key] for r in kd]
        assert max(values) - min(values) <= 1e-3 * max(abs(v) for v in values), f"variants disagree on {key}"

    if set(runs) != set(VARIANTS):
        return  # ratios need every variant

    def ratio(a: str, b: str, table: dict) -> str:
        return f"{table[a] / max(table[b], 1e-9):.2f}x"

    print(
        f"ratio V={vocab} {label}: kd-fused/ce-fused peak memory = {ratio('kd-fused', 'ce-fused', peak)}, "
        f"kd-naive/kd-fused peak memory = {ratio('kd-naive', 'kd-fused', peak)}, "
        f"kd-chunked/kd-fused = {ratio('kd-chunked', 'kd-fused', peak)}"
    )
    print(
        f"ratio V={vocab} {label}: kd-fused/kd-naive time = {ratio('kd-fused', 'kd-naive', secs)}, "
        f"kd-fused-recompute/kd-naive time = {ratio('kd-fused-recompute', 'kd-naive', secs)}, "
        f"kd-fused/ce-fused time = {ratio('kd-fused', 'ce-fused', secs)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 8192, N = 512, H = 64; seconds")
    parser.add_argument("--real", action="store_true", help="V = 49,152 from SmolLM2 on tinyshakespeare")
    parser.add_argument("--tokens", type=int, default=None, help="N tokens (default 4096, quick 512)")
    parser.add_argument("--hidden", type=int, default=None, help="H (default 576, quick 64)")
    parser.add_argument(
        "--vocab", type=int, nargs="*", default=None, help="default 131072 49152 (quick 8192)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved; medians")
    parser.add_argument(
        "--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS, help="default: all"
    )
    parser.add_argument(
        "--chunk", type=int, default=0, help="tokens per chunk of the fused variants (default: the library's)"
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, source, *numbers = args.worker
        print(json.dumps(worker(variant, source, *map(int, numbers))))
        return
    tokens = args.tokens or (512 if args.quick else 4096)
    hidden = args.hidden or (64 if args.quick else 576)
    chunk = f"chunks of {args.chunk} tokens" if args.chunk else "default chunks"
    print(
        f"KD loss forward+backward from hidden states, peak RSS above the inputs: N={tokens}, H={hidden}, "
        f"τ={TAU}, {chunk}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.real:
            source = str(Path(tmp) / "smollm2.safetensors")
            cases = [(real_inputs(Path(source), tokens), source, "SmolLM2")]
        else:
            vocabs = args.vocab or ([8192] if args.quick else [131072, 49152])
            cases = [(v, "random", "random") for v in vocabs]
        for vocab, source, label in cases:
            runs: dict[str, list[dict]] = {v: [] for v in args.variants}
            for _ in range(args.rounds):
                for v in args.variants:
                    runs[v].append(measure(v, source, vocab, tokens, hidden, args.chunk))
            report(vocab, label, runs)


if __name__ == "__main__":
    main()
