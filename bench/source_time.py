"""What each source costs in a training step: the share spent generating, and tokens/s.

Arms, all the same student, teacher (live), data, batch, τ and λ, timed side by side in interleaved rounds:

- ``dataset``: vanilla KD on the packed samples (the default source);
- ``on-policy``: the student continues each sample's first ``--prompt-tokens`` tokens (``--max-new-tokens``),
  the loss covers the generated tokens;
- ``mixed``: half the samples on-policy (``fraction`` 0.5), the others dataset text;
- ``teacher-generated``: the teacher continues the prompts greedily (sequence-level KD);
- ``generate`` and ``generate-no-cache``: the student writing one batch of continuations alone, with and
  without the KV cache (sampling and prompts as in ``on-policy``).

The models are randomly initialised, so continuations rarely hit EOS: every row writes all its tokens, the
worst case. Printed per arm: median step time, the share of it spent generating, trained tokens/s (the tokens
the loss covers) and generated tokens/s; then the ratios to the dataset step and the KV cache's speed-up.

Run: ``python bench/source_time.py`` (kd run's default models on the demo corpus) or ``--quick``.
"""

from __future__ import annotations

import argparse

import _common as C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps; seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1 if args.quick else 2
    s = C.setup(args.quick, "byte", args.threads)
    generation = {"prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens}
    sources = {
        "dataset": {"name": "dataset"},
        "on-policy": {"name": "on-policy", "params": generation},
        "mixed": {"name": "mixed", "params": {**generation, "fraction": 0.5}},
        "teacher-generated": {"name": "teacher-generated", "params": generation},
    }
    arms, generating = {}, {}
    for name, source in sources.items():
        t = C.trainer(s, teacher=s.teacher, source=source)
        generating[name] = []

        def step(t=t, name=name) -> float:
            before = t.history.generation_seconds
            tokens = C.engine_step(t)
            generating[name].append(t.history.generation_seconds - before)
            return tokens

        arms[name] = step
    arms.update(generation_arms(s, args.prompt_tokens, args.max_new_tokens))
    results = C.interleave(arms, steps, rounds, warmup)

    print(f"machine: {C.machine()}")
    print(
        f"models: teacher {s.teacher_spec}, student {s.student_spec}, batch {s.batch_size} x seq {s.seq_len}; "
        f"prompt {args.prompt_tokens} + {args.max_new_tokens} new tokens; {steps} steps x {rounds} rounds per arm"
    )
    for name, r in results.items():
        if name in generating:
            timed = generating[name][warmup:]
            share = sum(timed) / (r["mean_s"] * len(timed))
            rate = f"generating {share:4.0%}  {r['tokens_per_s']:8.0f} trained tokens/s"
        else:
            rate = f"{r['tokens_per_s']:8.0f} generated tokens/s"
        print(f"  {name:<18} median {r['median_s'] * 1e3:8.1f} ms/step  {rate}")
    m = {name: r["median_s"] for name, r in results.items()}
    for name in ("on-policy", "mixed", "teacher-generated"):
        print(f"ratio {name}/dataset step time = {m[name] / m['dataset']:.3f}")
    on_policy = generating["on-policy"][warmup:]
    print(
        f"ratio on-policy generating/step time = {sum(on_policy) / (results['on-policy']['mean_s'] * len(on_policy)):.3f}"
    )
    print(f"ratio generation no-cache/cache time = {m['generate-no-cache'] / m['generate']:.3f}")


def generation_arms(s: C.Setup, prompt_tokens: int, max_new_tokens: int) -> dict:
    """The student writing one batch of continuations, with and without the KV cache; generated tokens."""
    from kdcore.training.generation import generate, row_seeds

    model = C.student(s)
    ids = s.train.input_ids[: s.batch_size, :prompt_tokens]
    lengths = s.train.attention_mask[: s.batch_size, :prompt_tokens].sum(1)
    counter = iter(range(10**9))

    def write(use_cache: bool) -> float:
        out = generate(
            model,
            ids,
            lengths,
            max_new_tokens=max_new_tokens,
            pad_id=0,
            seeds=row_seeds(0, next(counter), range(s.batch_size)),
            use_cache=use_cache,
        )
        return float(out.generated_mask.sum())

    return {"generate": lambda: write(True), "generate-no-cache": lambda: write(False)}


if __name__ == "__main__":
    main()
