"""The page of a run directory: summary, strategy, plots, the difficulty and λ history, metrics, config."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kdcore.formats import significant
from kdcore.reports.page import esc, figure, page, read_json, read_yaml, render_png, table
from kdcore.summary import SUMMARY_FILE, RunSummary

RUN_PLOTS = (
    ("loss.png", "Training terms and eval perplexity"),
    ("lambda_pacing.png", "Mean λ and open share over steps"),
    ("difficulty.png", "Difficulty at the last re-sorts"),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return records


# -- difficulty history ----------------------------------------------------------------------------
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def difficulty_snapshots(path: Path) -> list[dict[str, Any]]:
    """``difficulty.parquet`` as one dict of numpy arrays per re-sort step (score, rank, lambda)."""
    if not path.is_file():
        return []
    import numpy as np
    import pyarrow.parquet as pq

    table_ = pq.read_table(path)
    if table_.num_rows == 0:
        return []
    columns = {name: table_.column(name).to_numpy() for name in table_.column_names}
    snapshots = []
    for step in np.unique(columns["step"]):
        rows = columns["step"] == step
        snapshots.append({"step": int(step), **{k: v[rows] for k, v in columns.items() if k != "step"}})
    return snapshots


def difficulty_table(snapshots: list[dict[str, Any]]) -> str:
    import numpy as np

    rows = []
    for snap in snapshots:
        scores = snap["score"][~np.isnan(snap["score"])]
        lam = snap["lambda"][~np.isnan(snap["lambda"])]
        q = [float(x) for x in np.quantile(scores, QUANTILES)] if scores.size else [None] * len(QUANTILES)
        lq = [float(x) for x in np.quantile(lam, (0.1, 0.5, 0.9))] if lam.size else [None] * 3
        rows.append([snap["step"], int(scores.size), *q, float(lam.mean()) if lam.size else None, *lq])
    headers = [
        "re-sort step",
        "scored samples",
        "score min",
        "p10",
        "p25",
        "median",
        "p75",
        "p90",
        "max",
        "mean λ",
        "λ p10",
        "λ median",
        "λ p90",
    ]
    return table(headers, rows, table_id="difficulty-history")


def difficulty_figures(snapshots: list[dict[str, Any]]) -> list[str]:
    """The difficulty distribution at each re-sort (one histogram row per step) and λ by rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figures = []
    scored = [(s["step"], s["score"][~np.isnan(s["score"])]) for s in snapshots]
    scored = [(step, scores) for step, scores in scored if scores.size]
    if scored:
        every = np.concatenate([scores for _, scores in scored])
        lo, hi = float(every.min()), float(every.max())
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, 31)
        grid = np.stack([np.histogram(scores, bins=edges)[0] / scores.size for _, scores in scored])
        fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.32 * len(scored) + 1.2))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", extent=(lo, hi, len(scored) - 0.5, -0.5))
        ax.set_yticks(range(len(scored)), [str(step) for step, _ in scored])
        ax.set(xlabel="difficulty score", ylabel="re-sort step", title="difficulty distribution per re-sort")
        fig.colorbar(image, ax=ax, label="share of samples")
        figures.append(
            figure(render_png(fig), "Difficulty distribution at each re-sort (rows), share per bin")
        )
    last = snapshots[-1] if snapshots else None
    known = np.isfinite(last["rank"]) & np.isfinite(last["lambda"]) if last is not None else None
    if last is not None and known.any():
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.scatter(last["rank"][known], last["lambda"][known], s=6, alpha=0.6)
        ax.set(
            xlabel="difficulty rank (0 = easiest)",
            ylabel="λ",
            ylim=(-0.05, 1.05),
            title=f"λ by difficulty rank at step {last['step']}",
        )
        figures.append(
            figure(render_png(fig), f"Reliance policy: λ against difficulty rank (step {last['step']})")
        )
    return figures


# -- the run view ----------------------------------------------------------------------------------
def is_run_dir(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (SUMMARY_FILE, "metrics.jsonl", "config.yaml"))


def run_label(summary: Mapping[str, Any] | None, strategies: Mapping[str, Any] | None) -> str:
    names = (summary or {}).get("strategy") or {
        kind: meta.get("name") for kind, meta in (strategies or {}).items() if isinstance(meta, Mapping)
    }
    parts = [names.get(k) for k in ("scorer", "pacing", "reliance") if names.get(k)]
    return " / ".join(parts) if parts else "run"


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of every labelled summary field the file holds."""
    return [(label, summary[key]) for key, label in RunSummary.labels().items() if key in summary]


def strategy_section(strategies: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> str:
    rows = []
    for kind, meta in (strategies or {}).items():
        if not isinstance(meta, Mapping):
            continue
        params = ", ".join(f"{k}={v}" for k, v in (meta.get("params") or {}).items()) or "—"
        dist = " ".join(str(meta.get(k, "")) for k in ("distribution", "version")).strip()
        rows.append([kind, meta.get("name"), params, dist or "—"])
    strategy_cfg = (config or {}).get("strategy", {})
    extra = ""
    if strategy_cfg:
        order = "hard to easy (anti-curriculum)" if strategy_cfg.get("reverse") else "easy to hard"
        extra = (
            f"<p>Temperature τ = {esc(significant(strategy_cfg.get('temperature')))}; curriculum order: {esc(order)}. "
            "Each sample's loss is (1-λ)·CE + λ·τ²·D(P<sub>T</sub> ‖ P<sub>S</sub>).</p>"
        )
    return table(["kind", "name", "parameters", "package"], rows, table_id="strategy") + extra


def metrics_section(records: list[dict[str, Any]]) -> str:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    keys = [
        k
        for k in ("loss", "ce", "kd", "lambda", "open_share", "lr", "tokens_per_second")
        if any(k in r for r in train)
    ]
    labels = {"lambda": "mean λ", "open_share": "open share", "tokens_per_second": "tokens/s"}
    parts = []
    if train:
        parts.append(
            "<h3>Training terms, mean λ and open share per logged step</h3>"
            + table(
                ["step", *(labels.get(k, k) for k in keys)],
                ([r["step"], *(r.get(k) for k in keys)] for r in train),
                table_id="train-log",
            )
        )
    if evals:
        parts.append(
            "<h3>Student eval perplexity</h3>"
            + table(
                ["step", "eval perplexity"], ([r["step"], r["eval_ppl"]] for r in evals), table_id="eval-log"
            )
        )
    return "".join(parts) or "<p>No metrics were logged.</p>"


def build_run_report(directory: Path) -> tuple[str, str]:
    """(title, HTML) for a run directory."""
    summary = read_json(directory / SUMMARY_FILE)
    strategies = read_yaml(directory / "strategies.yaml")
    config_text = (directory / "config.yaml").read_text() if (directory / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) if config_text else None
    records = read_metrics(directory / "metrics.jsonl")
    snapshots = difficulty_snapshots(directory / "difficulty.parquet")

    title = f"kdcore run: {run_label(summary, strategies)}"
    status = (
        '<span class="badge">finished</span>'
        if summary is not None
        else '<span class="badge warn">not finished (no summary.json)</span>'
    )
    subtitle = f"{status} <code>{esc(directory.resolve())}</code>"
    sections = []
    if summary is not None:
        sections.append(
            ("summary", "Summary", table(["metric", "value"], summary_rows(summary), table_id="summary"))
        )
    sections.append(("strategy", "Strategy", strategy_section(strategies, config)))
    plots = [
        figure((directory / name).read_bytes(), caption)
        for name, caption in RUN_PLOTS
        if (directory / name).is_file()
    ]
    plots += difficulty_figures(snapshots) if snapshots else []
    sections.append(("plots", "Plots", "".join(plots) or "<p>No plots yet.</p>"))
    history = (
        "<p>Per-sample difficulty score and λ at each curriculum re-sort (<code>difficulty.parquet</code>); "
        "quantiles over the samples the scorer had scored.</p>" + difficulty_table(snapshots)
        if snapshots
        else "<p>No difficulty history (the run has not re-sorted yet, or the scorer is <code>none</code>).</p>"
    )
    sections.append(("difficulty", "Difficulty and λ history", history))
    sections.append(("metrics", "Metrics over steps", metrics_section(records)))
    if summary and summary.get("eval_curve"):
        curve = table(["step", "eval perplexity"], summary["eval_curve"], table_id="eval-curve")
        sections.append(("eval-curve", "Eval curve (summary.json)", curve))
    config_html = f"<pre>{esc(config_text)}</pre>" if config_text else "<p>No config.yaml.</p>"
    sections.append(("config", "Resolved config", config_html))
    files = sorted(
        p.relative_to(directory).as_posix() for p in directory.iterdir() if not p.name.startswith(".")
    )
    card = directory / "student" / "README.md"
    note = " The student's model card is <code>student/README.md</code>." if card.is_file() else ""
    sections.append(("files", "Files", f"<p>{esc(', '.join(files))}.{note}</p>"))
    return title, page(title, subtitle, sections)
