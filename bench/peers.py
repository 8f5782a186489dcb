"""Training throughput (tokens/s) of kdcore against peers: a HF ``Trainer`` with a KD loss, and TRL's GKD.

Same student, teacher, packed demo data, batch, optimizer (AdamW, lr 3e-3, wd 0.01, cosine, clip 1.0)
and steps for every arm; tokens are the labelled positions a step trains on (the next-token
targets of non-padding tokens, the same count for every arm). Arms:

- ``kdcore``: the engine with the live teacher, fixed λ = 0.5: ``0.5·CE + 0.5·τ²·KL(P_T‖P_S)``, τ = 2.
- ``kdcore-cache``: the same from a top-32 teacher cache (``kd run --teacher-cache``).
- ``hf-trainer``: ``transformers.Trainer`` subclass whose ``compute_loss`` runs the teacher and
  computes the same objective the plain way (``log_softmax`` of both, ``F.kl_div``, masked mean).
- ``trl-gkd`` (when ``trl`` is installed: ``pip install -e '.[bench]'``):
  ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy generation), ``beta=0``
  (forward KL), ``seq_kd=False``: off-policy KD on the same samples, fed by a collator that hands
  it the packed ``input_ids``/``attention_mask``/``labels`` (its own ChatML collator needs chat
  samples; GKD's loss masks ``labels == -100`` exactly as the other arms do). GKD's objective is the
  KL alone at τ = 1 (it passes no temperature to its loss), without a CE term: a little less work.

Each arm's step time is the time between consecutive optimizer steps of its own loop (data loading
included), median over all timed steps; the arms run in interleaved rounds.

Run: ``python bench/peers.py`` or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

TAU = 2.0


def hf_dataset(s):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": s.train.input_ids.tolist(), "attention_mask": s.train.attention_mask.tolist()}
    )


def collate(rows):
    input_ids = torch.tensor([r["input_ids"] for r in rows])
    mask = torch.tensor([r["attention_mask"] for r in rows])
    labels = input_ids.masked_fill(mask == 0, -100)  # HF convention: the loss shifts them
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class StepClock:
    """A TrainerCallback recording the time of each optimizer step's end."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.stamps.append(time.perf_counter())

            def on_train_begin(self, args, state, control, **kwargs):
                clock.stamps.append(time.perf_counter())

        self.stamps: list[float] = []
        self.callback = _CB()

    def step_times(self, skip: int) -> list[float]:
        diffs = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return diffs[skip:]


def quiet(trainer) -> None:
    """No metrics dict printed at the end of each HF run."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def hf_args(cls, out: str, s, steps: int, **extra):
    """``extra``: fields over these (``use_cpu=False`` and ``bf16=True`` on a GPU)."""
    settings = dict(
        output_dir=out,
        per_device_train_batch_size=s.batch_size,
        max_steps=steps,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    return cls(**{**settings, **extra})


def run_hf(s, steps: int, warmup: int, tmp: str, student=None) -> tuple[list[float], list[float]]:
    from transformers import Trainer, TrainingArguments

    counted: list[float] = []
    teacher = s.teacher

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                t_logits = teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            s_logits = out.logits[:, :-1]
            mask = labels != -100
            s_logp = F.log_softmax(s_logits / TAU, -1)
            t_logp = F.log_softmax(t_logits[:, :-1] / TAU, -1)
            kl = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
            ce = F.cross_entropy(s_logits.transpose(1, 2), labels, reduction="none")
            n = mask.sum(1).clamp(min=1)
            per_sample = 0.5 * (ce * mask).sum(1) / n + 0.5 * TAU**2 * (kl * mask).sum(1) / n
            counted.append(float(mask.sum()))
            return per_sample.mean()

    clock = StepClock()
    C.reset_accelerate()
    trainer = KDTrainer(
        model=student if student is not None else C.student(s),
        args=hf_args(TrainingArguments, tmp, s, warmup + steps),
        train_dataset=hf_dataset(s),
        data_collator=collate,
        callbacks=[clock.callback],
    )
    quiet(trainer)
    trainer.train()
    return clock.step_times(warmup), counted[warmup:]


def run_gkd(
    s, steps: int, warmup: int, tmp: str, student=None, **config: object
) -> tuple[list[float], list[float]]:
    """``config``: GKDConfig fields over the defaults (which include ``bf16=True`` and
    ``gradient_checkpointing=True``)."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    counted: list[float] = []

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counted.append(float((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    clock = StepClock()
    C.reset_accelerate()
    args = hf_args(
        GKDConfig, tmp, s, warmup + steps, lmbda=0.0, beta=0.0, seq_kd=False, max_length=s.seq_len, **config
    )
    trainer = CountingGKD(
        model=student if student is not None else C.student(s),
        teacher_model=s.teacher,
        args=args,
        train_dataset=hf_dataset(s),
        data_collator=collate,
        processing_class=s.tokenizer,
        callbacks=[clock.callback],
    )
    quiet(trainer)
    trainer.train()
    return clock.step_times(warmup), counted[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps; seconds")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arm even if trl is installed")
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1 if args.quick else 3
    s = C.setup(args.quick, "byte", args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if args.no_trl:
            raise ImportError("--no-trl")
        import trl  # noqa: F401

        has_trl = True
    except ImportError as exc:
        has_trl = False
        print(f"trl arm skipped: {exc} (pip install -e '.[bench]')")

    from kdcore.teachers.cache import TeacherCache, write_cache

    times: dict[str, list[float]] = {}
    tokens: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(s.teacher, s.train, s.eval_set, s.tokenizer, Path(tmp) / "k32", top_k=32)
        cache = TeacherCache.open(Path(tmp) / "k32")
        for _ in range(rounds):
            for name in ("kdcore", "kdcore-cache"):
                t = C.trainer(
                    s,
                    teacher=s.teacher if name == "kdcore" else None,
                    cache=cache if name != "kdcore" else None,
                )
                for _ in range(warmup):
                    C.engine_step(t)
                for _ in range(steps):
                    start = time.perf_counter()
                    n = C.engine_step(t)
                    times.setdefault(name, []).append(time.perf_counter() - start)
                    tokens.setdefault(name, []).append(n)
            arms = [("hf-trainer", run_hf)] + ([("trl-gkd", run_gkd)] if has_trl else [])
            for name, fn in arms:
                ts, ns = fn(s, steps, warmup, str(Path(tmp) / name))
                times.setdefault(name, []).extend(ts)
                tokens.setdefault(name, []).extend(ns)

    print(f"machine: {C.machine()}")
    print(
        f"models: teacher {s.teacher_spec}, student {s.student_spec}, batch {s.batch_size} x seq {s.seq_len}; "
        f"{steps} timed steps x {rounds} rounds per arm"
    )
    rate = {}
    for name in times:
        median = statistics.median(times[name])
        rate[name] = statistics.fmean(tokens[name]) / median
        print(f"  {name:<13} median {median * 1e3:8.2f} ms/step  {rate[name]:10.0f} tokens/s")
    for ours, peer in (
        ("kdcore", "hf-trainer"),
        ("kdcore", "trl-gkd"),
        ("kdcore-cache", "hf-trainer"),
        ("kdcore-cache", "trl-gkd"),
        ("kdcore-cache", "kdcore"),
    ):
        if ours in rate and peer in rate:
            print(f"ratio {ours}/{peer} tokens/s = {rate[ours] / rate[peer]:.3f}")


if __name__ == "__main__":
    main()
