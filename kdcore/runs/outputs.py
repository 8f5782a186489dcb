"""What a run shows: metrics.jsonl, the summary table, the difficulty history, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdcore.files import atomic_path
from kdcore.summary import RunSummary


class MetricsWriter:
    """Appends one JSON object per log step to ``metrics.jsonl`` and keeps them for the plots."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def print_summary(console: Console, summary: RunSummary) -> None:
    strategy = summary.strategy
    table = Table(title=f"kd run: {strategy['scorer']} / {strategy['pacing']} / {strategy['reliance']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    label = RunSummary.labels()
    rows = [
        (label["teacher_eval_ppl"], f"{summary.teacher_eval_ppl:.3f}"),
        (
            label["student_eval_ppl"],
            f"{summary.student_eval_ppl:.3f} (from {summary.student_initial_eval_ppl:.1f})",
        ),
        (label["steps"], str(summary.steps)),
        (label["tokens_per_second"], f"{summary.tokens_per_second:,.0f}"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
        (label["mean_lambda"], f"{summary.mean_lambda:.3f}"),
        (label["final_open_share"], f"{summary.final_open_share:.0%}"),
    ]
    if summary.difficulty_spearman is not None:
        rows.append((label["difficulty_spearman"], f"{summary.difficulty_spearman:.3f}"))
    rows.append(("run directory", summary.run_dir))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def write_history(path: Path, difficulty: list[dict[str, Any]]) -> None:
    """Per-sample score, rank and λ at each curriculum re-sort, as one parquet table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[Any]] = {"sample_id": [], "step": [], "score": [], "rank": [], "lambda": []}
    for snapshot in difficulty:
        n = len(snapshot["scores"])
        columns["sample_id"].append(np.arange(n, dtype=np.int64))
        columns["step"].append(np.full(n, snapshot["step"], dtype=np.int64))
        columns["score"].append(snapshot["scores"].numpy().astype(np.float32))
        columns["rank"].append(snapshot["ranks"].numpy().astype(np.float32))
        columns["lambda"].append(snapshot["lambda"].numpy().astype(np.float32))
    table = pa.table(
        {
            key: np.concatenate(parts) if parts else np.array([], dtype=np.float32)
            for key, parts in columns.items()
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as the PNG ``path``, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(run_dir: Path, records: list[dict[str, Any]], difficulty: list[dict[str, Any]]) -> list[Path]:
    """Loss curves, mean λ and open share over steps, and difficulty histograms per re-sort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "ce", "kd"):
        ax_train.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax_train.set(xlabel="step", title="training terms (per sample mean)")
    ax_train.legend()
    ax_eval.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], marker="o")
    ax_eval.set(xlabel="step", ylabel="perplexity", title="eval perplexity", yscale="log")
    save_figure(fig, run_dir / "loss.png")
    plt.close(fig)
    written.append(run_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["step"] for r in train], [r["lambda"] for r in train], label="mean λ")
    ax.plot([r["step"] for r in train], [r["open_share"] for r in train], label="open share")
    ax.set(xlabel="step", ylim=(0, 1.05), title="reliance and pacing")
    ax.legend()
    save_figure(fig, run_dir / "lambda_pacing.png")
    plt.close(fig)
    written.append(run_dir / "lambda_pacing.png")

    known = [(s["step"], s["scores"].numpy()) for s in difficulty]
    known = [(step, scores[~np.isnan(scores)]) for step, scores in known]
    known = [(step, scores) for step, scores in known if scores.size]
    if known:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for step, scores in known[-6:]:
            ax.hist(scores, bins=30, histtype="step", label=f"step {step}")
        ax.set(xlabel="difficulty score", ylabel="samples", title="difficulty at each re-sort")
        ax.legend(fontsize="small")
        save_figure(fig, run_dir / "difficulty.png")
        plt.close(fig)
        written.append(run_dir / "difficulty.png")
    return written
