"""Time of the per-sample loss (forward + backward), with and without activation checkpointing.

``per_sample_terms`` checkpoints a chunk only when its ``[tokens, vocab]`` tensors hold at least
``CHECKPOINT_MIN_ELEMENTS`` elements; below that, recomputing the softmaxes in the backward pass
costs time and saves only a few MiB. This measures that choice on one engine micro-batch of the
demo setting (B·T = 16 × 128 tokens, byte vocabulary V = 259): CE only (the plain CE floor), KD
with dense teacher logits (live teacher), and KD from a top-32 teacher cache (plus the cache
lookup itself), each with every chunk checkpointed (``forced``) and with the default threshold,
interleaved in rounds; medians.

Run: ``python bench/loss_time.py`` or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; seconds")
    parser.add_argument("--repeat", type=int, default=None, help="calls per variant (default 100)")
    args = parser.parse_args()
    repeat = args.repeat or (5 if args.quick else 100)

    import kdcore.training.losses as losses
    from kdcore.inputs.packing import shift_labels
    from kdcore.plugins import get_registry
    from kdcore.teachers.cache import TeacherCache, write_cache

    s = C.setup(args.quick, "byte", 1)
    div = get_registry().create("divergence", "forward-kl", {})
    ids = torch.arange(s.batch_size)
    x, m = s.train.input_ids[ids], s.train.attention_mask[ids]
    labels = shift_labels(x, m)
    vocab = int(s.teacher.get_output_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    student = torch.randn(*x.shape, vocab, generator=g, requires_grad=True)
    with torch.no_grad():
        teacher = s.teacher(input_ids=x, attention_mask=m).logits
    default = losses.CHECKPOINT_MIN_ELEMENTS
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, Path(tmp) / "k32", top_k=32)
        cache = TeacherCache.open(Path(tmp) / "k32")
        top = cache.topk(ids, labels)

        def loss(t):
            def run():
                terms = losses.per_sample_terms(student, labels, t, div if t is not None else None, 2.0)
                (terms.ce + terms.kd).sum().backward()

            return run

        variants = {"ce": loss(None), "dense-kd": loss(teacher), "cache-k32": loss(top)}
        times: dict[str, list[float]] = {}
        for _ in range(repeat):
            for name, fn in variants.items():
                for mode, threshold in (("forced", 0), ("default", default)):
                    losses.CHECKPOINT_MIN_ELEMENTS = threshold
                    start = time.perf_counter()
                    fn()
                    times.setdefault(f"{name} {mode}", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            cache.topk(ids, labels)
            times.setdefault("cache lookup", []).append(time.perf_counter() - start)
        losses.CHECKPOINT_MIN_ELEMENTS = default

    print(f"machine: {C.machine()}")
    print(f"loss forward+backward on {x.shape[0]} x {x.shape[1]} tokens, V={vocab}, τ=2; {repeat} calls each")
    med = {name: statistics.median(v[1:] or v) for name, v in times.items()}
    for name, value in med.items():
        print(f"  {name:<20} {value * 1e3:8.2f} ms")
    for name in variants:
        print(
            f"ratio {name} forced-checkpoint/default time = {med[f'{name} forced'] / med[f'{name} default']:.3f}"
        )
    print(f"ratio cache-k32/ce loss time (default) = {med['cache-k32 default'] / med['ce default']:.3f}")


if __name__ == "__main__":
    main()
