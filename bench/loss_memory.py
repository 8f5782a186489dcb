"""Peak memory of the KD loss, forward + backward: naive vs kdcore's chunked loss vs a fused variant.

Each variant runs in a fresh subprocess, and the peak resident memory of that process
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is read after one forward + backward; the RSS
measured after building the inputs (and touching every buffer once) is subtracted, so the
figure is what the loss itself adds. Setting (Liger-Kernel's fused-linear JSD benchmark, scaled
to a CPU): the student's hidden states ``[N, H]`` and LM head ``[V, H]`` (trainable), the
teacher's logits ``[N, V]`` (given, no gradient), forward KL at τ = 2.

- ``naive``: student logits = hidden @ Wᵀ, then ``log_softmax`` of both and ``F.kl_div``, whole.
- ``chunked``: the same student logits, then :func:`kdcore.training.losses.per_sample_terms` (what the
  engine runs): chunks of ``--chunk`` tokens under activation checkpointing.
- ``fused``: the LM-head projection is chunked too (hidden rows × W per chunk, inside the
  checkpoint), so the ``[N, V]`` student logits and their gradient never exist at once. A
  demonstration in this script only; the engine receives logits from the model.

Run: ``python bench/loss_memory.py`` (full: V = 32k and 128k, N = 1024 tokens, H = 256) or
``--quick`` (V = 8k, N = 256; seconds). Prints one ``ratio`` line per vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(variant: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from kdcore.plugins import get_registry
    from kdcore.training.losses import per_sample_terms

    div = get_registry().create("divergence", "forward-kl", {})
    torch.set_num_threads(1)
    tau = 2.0

    def inputs(vocab: int, tokens: int):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden, generator=g)
        w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_(True)
        w.grad = torch.zeros_like(w)  # the parameter's gradient buffer exists in training anyway
        teacher = torch.randn(tokens, vocab, generator=g) * 2
        labels = torch.randint(0, vocab, (tokens,), generator=g)
        return h, w, teacher, labels

    def piece(h_c, w_, t_c, y_c):
        s_c = h_c @ w_.T
        s_logp = F.log_softmax(s_c / tau, -1)
        t_logp = F.log_softmax(t_c / tau, -1)
        kd = F.kl_div(s_logp, t_logp, reduction="sum", log_target=True) * tau**2
        ce = F.cross_entropy(s_c, y_c, reduction="sum")
        return 0.5 * kd + 0.5 * ce

    def step(h, w, teacher, labels, chunk: int) -> None:
        n = h.shape[0]
        if variant == "naive":
            piece(h, w, teacher, labels).div(n).backward()
        elif variant == "chunked":
            s = h @ w.T
            terms = per_sample_terms(s[None], labels[None], teacher[None], div, tau, chunk_tokens=chunk)
            (0.5 * terms.kd + 0.5 * terms.ce).sum().backward()
        elif variant == "fused":
            total = 0.0
            for rows in torch.arange(n).split(chunk):
                total = total + checkpoint(
                    piece,
                    h[rows],
                    w,
                    teacher[rows],
                    labels[rows],
                    use_reentrant=False,
                    preserve_rng_state=False,
                )
            (total / n).backward()
        else:
            raise SystemExit(f"unknown variant {variant}")

    step(*inputs(64, 16), chunk=4)  # warm-up: lazy imports and allocator set-up stay out of the figure
    h, w, teacher, labels = inputs(vocab, tokens)
    base = current_rss_mib()
    start = time.perf_counter()
    step(h, w, teacher, labels, chunk)
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "peak_mib": rss_mib() - base,
        "seconds": seconds,
        "grad_norm": float(w.grad.norm()),
    }


#: glibc's malloc raises its mmap threshold each time a large block is freed, after which large
#: tensors come from the heap and freed ones are kept by the process: RSS then shows the allocator's
#: high-water mark, not the live tensors. A fixed threshold returns every large block to the OS.
ALLOCATORS = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def measure(variant: str, vocab: int, tokens: int, hidden: int, chunk: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, str(vocab), str(tokens), str(hidden), str(chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"{variant} V={vocab} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one allocator setting; seconds")
    parser.add_argument("--tokens", type=int, default=None, help="B·T tokens (default 1024, quick 256)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default 128, quick 64)")
    parser.add_argument(
        "--vocab", type=int, nargs="*", default=None, help="default 32768 131072 (quick 8192)"
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, *numbers = args.worker
        print(json.dumps(worker(variant, *map(int, numbers))))
        return
    tokens = args.tokens or (256 if args.quick else 1024)
    chunk = args.chunk or (64 if args.quick else 128)
    vocabs = args.vocab or ([8192] if args.quick else [32768, 131072])
    allocators = dict(list(ALLOCATORS.items())[1:]) if args.quick else ALLOCATORS
    print(
        f"KD loss forward+backward, peak RSS above the inputs: N={tokens} tokens, H={args.hidden}, chunk={chunk}"
    )
    for vocab in vocabs:
        for name, env in allocators.items():
            results = {
                v: measure(v, vocab, tokens, args.hidden, chunk, env) for v in ("naive", "chunked", "fused")
            }
            for r in results.values():
                print(
                    f"  V={vocab:>6} [{name}] {r['variant']:<8} peak {r['peak_mib']:9.1f} MiB  {r['seconds']:6.2f} s"
                )
            grads = [r["grad_norm"] for r in results.values()]
            assert max(grads) - min(grads) <= 1e-3 * max(grads), f"variants disagree: {grads}"
            naive = results["naive"]["peak_mib"]
            print(
                f"ratio V={vocab} [{name}]: naive/chunked peak memory = "
                f"{naive / max(results['chunked']['peak_mib'], 1):.2f}x, "
                f"naive/fused = {naive / max(results['fused']['peak_mib'], 1):.2f}x"
            )


if __name__ == "__main__":
    main()
