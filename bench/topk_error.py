"""How much a top-K teacher cache changes distillation, against the live teacher (full vocabulary).

1. The KD term itself: over the whole training set, the token-weighted mean of the KD term with
   the full teacher and with top-K + rest bucket, for an untrained student and for the student
   the live run trained, at τ = 1 and 2 (where the cached tail is exact) and τ = 4 (interpolated).
2. End to end: ``kd run`` with the live teacher and with caches of K = 8, 32 and V; the students'
   eval perplexity, and the largest per-step difference of the logged train loss.

Run: ``python bench/topk_error.py`` (kd run's defaults on the demo corpus: the default teacher is
trained once and cached, 200 steps per run) or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common as C  # noqa: F401  (offline environment, import path)
import torch


def bucket_kl(s_logits, t_logits, indices, labels, tau: float) -> torch.Tensor:
    """Per-sample mean τ²·KL over the K cached ids + one rest bucket, with the tail's exact mass at τ."""
    import torch.nn.functional as F

    s_logp = F.log_softmax(s_logits.double() / tau, -1)
    t_logp = F.log_softmax(t_logits.double() / tau, -1)
    parts = []
    for logp in (t_logp, s_logp):
        rest = logp.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
        parts.append(torch.cat([logp.gather(-1, indices), rest], -1))
    t_all, s_all = parts
    kl = (t_all.exp() * (t_all - s_all)).sum(-1)
    mask = (labels != -100).double()
    return tau**2 * (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


def kd_mean(student, teacher, cache, data, tau: float, divergence) -> tuple[float, float, float]:
    """Token-weighted mean KD term over ``data``: full teacher, cached top-K, and top-K with the
    tail's exact mass at τ (what the cache would give if it stored f(1/τ) for this τ)."""
    from kdcore.inputs.packing import shift_labels
    from kdcore.training.losses import per_sample_terms

    full = sparse = exact = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            ids = torch.arange(start, min(start + 64, len(data)))
            x, m = data.input_ids[ids], data.attention_mask[ids]
            labels = shift_labels(x, m)
            s = student(input_ids=x, attention_mask=m).logits
            t = teacher(input_ids=x, attention_mask=m).logits
            a = per_sample_terms(s, labels, t, divergence, tau)
            top = cache.topk(ids, labels)
            b = per_sample_terms(s, labels, top, divergence, tau)
            full += float((a.kd * a.tokens).sum())
            sparse += float((b.kd * b.tokens).sum())
            exact += float((bucket_kl(s, t, top.indices, labels, tau) * a.tokens).sum())
            tokens += float(a.tokens.sum())
    return full / tokens, sparse / tokens, exact / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps; seconds")
    parser.add_argument("--top-k", type=int, nargs="*", default=[8, 32])
    args = parser.parse_args()

    from kdcore.config import resolve_config
    from kdcore.inputs.corpus import load_corpus
    from kdcore.inputs.models import build_from_spec, load_pretrained, parse_spec
    from kdcore.plugins import get_registry
    from kdcore.runs.runner import run
    from kdcore.teachers.cache import TeacherCache, build_cache

    torch.set_num_threads(1)
    # the setting of docs/performance.md's table (kd run's defaults when it was measured)
    overrides = {
        "training.log_every": 1,
        "model.teacher_steps": 250,
        "training.max_steps": 200,
        "strategy.temperature": 2.0,
    }
    if args.quick:
        overrides.update(
            {
                "model.teacher": "gpt2:n_layer=1,n_embd=32,n_head=2",
                "model.student": "gpt2:n_layer=1,n_embd=16,n_head=2",
                "model.teacher_steps": 10,
                "data.seq_len": 32,
                "data.demo_samples": 60,
                "data.max_eval_samples": 16,
                "training.max_steps": 4,
                "training.batch_size": 8,
            }
        )
    forward_kl = get_registry().create("divergence", "forward-kl", {})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = resolve_config(None, {**overrides, "output.dir": str(root / "live")})
        manifests = {k: build_cache(base, root / f"k{k}", top_k=k) for k in [*args.top_k, 10**7]}
        vocab = manifests[10**7]["vocab_size"]
        runs = {"live": run(base, show_progress=False)}
        for k in manifests:
            cfg = resolve_config(
                None,
                {
                    **overrides,
                    "output.dir": str(root / f"run{k}"),
                    "model.teacher_cache": str(root / f"k{k}"),
                },
            )
            runs[f"K={min(k, vocab)}"] = run(cfg, show_progress=False)

        def losses(result):
            lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
            return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

        live_losses = losses(runs["live"])
        print(
            f"models: teacher {base.model.teacher}, student {base.model.student}, vocab {vocab}, "
            f"{base.training.max_steps} steps, τ = {base.strategy.temperature}"
        )
        print(f"  teacher eval ppl {runs['live'].summary['teacher_eval_ppl']:.3f}")
        for name, result in runs.items():
            diff = max(abs(a - b) for a, b in zip(losses(result), live_losses, strict=True))
            print(
                f"  {name:<7} student eval ppl {result.summary['student_eval_ppl']:8.3f}   "
                f"max |train loss - live| {diff:.2e}"
            )
        live_ppl = runs["live"].summary["student_eval_ppl"]
        for k in args.top_k:
            ppl = runs[f"K={k}"].summary["student_eval_ppl"]
            print(f"ratio K={k}/live student eval ppl = {ppl / live_ppl:.4f}")

        corpus = load_corpus(base.data, base.training.seed)
        cache_full = TeacherCache.open(root / f"k{10**7}")
        train, _ = corpus.pack(cache_full.tokenizer(), base.data.seq_len)
        teacher = load_pretrained(manifests[10**7]["teacher_source"]).eval()
        students = {
            "untrained student": build_from_spec(
                parse_spec(base.model.student), cache_full.tokenizer(), 0
            ).eval(),
            "trained student": load_pretrained(str(runs["live"].run_dir / "student")).eval(),
        }
        if args.quick:  # the smoke test: one student, one temperature
            students.pop("untrained student")
        for label, student in students.items():
            for tau in (2.0,) if args.quick else (1.0, 2.0, 4.0):
                for k in args.top_k:
                    full, sparse, exact = kd_mean(
                        student, teacher, TeacherCache.open(root / f"k{k}"), train, tau, forward_kl
                    )
                    print(
                        f"  {label}, τ={tau:g}, K={k}: KD term full {full:.4f}, top-K+rest {sparse:.4f} "
                        f"(with the tail's exact mass at τ: {exact:.4f})"
                    )
                    print(f"ratio KD term K={k}/full, {label}, τ={tau:g} = {sparse / full:.4f}")


if __name__ == "__main__":
    main()
