"""Step time of the engine: plain CE (the floor), live-teacher KD, and KD from the teacher cache.

Arms, all the same student, data and batch, timed side by side in interleaved rounds:

- ``ce``: plain cross-entropy training of the student (reliance ``none``: no teacher pass at all);
- ``teacher-fwd``: the teacher's no-grad forward pass alone on a batch (what live KD must add);
- ``live``: KD with the live teacher (reliance ``fixed``, λ = 0.5, τ = 2, forward KL);
- ``cache-kK``: the same KD from a teacher cache holding the top-K tokens (``kd run --teacher-cache``).

Printed ratios: live / (ce + teacher-fwd) (what the KD loss costs beyond the two forward passes it
needs), live / ce, and cache / ce (target: within 10 %).

Run: ``python bench/step_time.py`` (kd run's default models on the demo corpus) or ``--quick``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common as C
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps; seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--top-k", type=int, nargs="*", default=None, help="cache sizes (default 32 and V)")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (V = 259) or 'bpe:vocab_size=N'")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    s = C.setup(args.quick, args.tokenizer, args.threads)
    vocab = int(s.teacher.get_output_embeddings().weight.shape[0])
    top_ks = args.top_k or [32, vocab]

    from kdcore.teachers.cache import TeacherCache, write_cache

    arms = {}
    ce = C.trainer(s, reliance="none")
    arms["ce"] = lambda: C.engine_step(ce)
    live = C.trainer(s, teacher=s.teacher)

    def teacher_forward() -> float:
        ids = live.sampler.batch(0)
        input_ids, mask, labels = s.train.batch(ids)
        with torch.no_grad():  # the teacher's side of the live step, on the loss path it takes
            if live.loss_path == "fused":
                live.passes.teacher_hidden(input_ids, mask)
            else:
                live.passes.teacher_logits(ids, labels, input_ids, mask)
        return float(mask[:, 1:].sum())

    arms["teacher-fwd"] = teacher_forward
    arms["live"] = lambda: C.engine_step(live)
    with tempfile.TemporaryDirectory() as tmp:
        for k in top_ks:
            directory = Path(tmp) / f"k{k}"
            write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, directory, top_k=k)
            t = C.trainer(s, cache=TeacherCache.open(directory))
            arms[f"cache-k{min(k, vocab)}"] = lambda t=t: C.engine_step(t)
        results = C.interleave(arms, steps, rounds, warmup=1 if args.quick else 3)

    print(f"machine: {C.machine()}")
    print(
        f"models: teacher {s.teacher_spec}, student {s.student_spec}, vocab {vocab}, "
        f"batch {s.batch_size} x seq {s.seq_len}; {steps} steps x {rounds} rounds per arm"
    )
    for name, r in results.items():
        print(f"  {name:<12} median {r['median_s'] * 1e3:8.2f} ms/step  {r['tokens_per_s']:10.0f} tokens/s")
    m = {name: r["median_s"] for name, r in results.items()}
    print(f"ratio live/(ce+teacher-fwd) step time = {m['live'] / (m['ce'] + m['teacher-fwd']):.3f}")
    print(f"ratio live/ce step time = {m['live'] / m['ce']:.3f}")
    for name in m:
        if name.startswith("cache-"):
            print(f"ratio {name}/ce step time = {m[name] / m['ce']:.3f}")


if __name__ == "__main__":
    main()
