"""``kd report DIR``: one self-contained HTML page for a run directory or a comparison directory.

Everything is inside the file: plots are base64 PNG ``data:`` URIs, the style sheet is inline, and
there is no script and no external URL, so the page reads offline, attached to an e-mail or
archived beside the run.

A **run directory** (``summary.json``, ``config.yaml``, ``strategies.yaml``, ``metrics.jsonl``,
``difficulty.parquet``, ``*.png``) gives: the summary table, the strategy and its parameters, the
plots the run wrote plus two drawn here from ``difficulty.parquet`` (the difficulty distribution at
each re-sort, λ against difficulty rank at the last one), the difficulty and λ quantiles per re-sort,
the training terms, mean λ and open share per logged step, the eval curve, and the resolved config.
A run that has not finished (no ``summary.json``) is reported from what exists.

A **comparison directory** (``kd compare``) is recognised by ``comparison.json`` or a
``runs/<arm>/seed-<s>/`` tree. Its page is built from files whose shape is stable:

- ``runs/<arm>/seed-<s>/summary.json``: one row per run, and per arm the mean ± standard deviation
  over seeds of the student's and the teacher's eval perplexity, mean λ and wall time;
- every ``*.png`` in the directory, embedded;
- ``comparison.md``, rendered (headings, paragraphs, lists, pipe tables, code);
- ``comparison.json``, rendered generically: top-level scalars as a key/value table, a list of
  objects (or an object of objects, e.g. ``{"arms": {"name": {...}}}``) as a table with one row per
  item and nested keys flattened with dots.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdcore import __version__, formats
from kdcore.compare.stats import mean_sd
from kdcore.errors import KdError
from kdcore.files import atomic_write_text
from kdcore.formats import MISSING, significant
from kdcore.summary import SUMMARY_FILE, RunSummary

REPORT = "report.html"
RUN_PLOTS = (
    ("loss.png", "Training terms and eval perplexity"),
    ("lambda_pacing.png", "Mean λ and open share over steps"),
    ("difficulty.png", "Difficulty at the last re-sorts"),
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:32px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:1rem;margin:18px 0 8px}
.sub{color:#5b6372;margin:0 0 18px;font-size:.9rem}
table{border-collapse:collapse;background:#fff;margin:6px 0 14px;font-size:.86rem}
th,td{border:1px solid #d8dce3;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:6px 12px 12px 0;background:#fff;border:1px solid #d8dce3;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.8rem;color:#5b6372;margin-top:4px}
pre{background:#fff;border:1px solid #d8dce3;padding:10px;overflow:auto;font-size:.8rem}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.badge{display:inline-block;border-radius:3px;padding:1px 7px;font-size:.78rem;background:#e3f1e5;color:#1c6b2a}
.badge.warn{background:#fbeed5;color:#8a5300}
nav a{margin-right:12px;font-size:.86rem;color:#2451a6}
details{margin:6px 0}.tw{overflow-x:auto;max-width:100%}
"""


# -- small HTML helpers ----------------------------------------------------------------------------
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(
                f'<td class="num">{esc(significant(value))}</td>'
                if numeric
                else f"<td>{esc(significant(value))}</td>"
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<div class="tw"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(data: bytes, caption: str) -> str:
    return (
        f'<figure><img src="{png_data_uri(data)}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A whole HTML document; ``sections`` are (anchor, heading, inner HTML)."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{inner}</section>' for a, h, inner in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{esc(title)}</h1><p class="sub">{subtitle} · kdcore {esc(__version__)} · generated {esc(stamp)}</p>'
        f"<nav>{nav}</nav>{body}</main></body></html>\n"
    )


def _render_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


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
            figure(_render_png(fig), "Difficulty distribution at each re-sort (rows), share per bin")
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
            figure(_render_png(fig), f"Reliance policy: λ against difficulty rank (step {last['step']})")
        )
    return figures


# -- the run view ----------------------------------------------------------------------------------
def is_run_dir(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (SUMMARY_FILE, "metrics.jsonl", "config.yaml"))


def is_comparison_dir(directory: Path) -> bool:
    return (directory / "comparison.json").is_file() or any((directory / "runs").glob("*/seed-*"))


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
    summary = _read_json(directory / SUMMARY_FILE)
    strategies = _read_yaml(directory / "strategies.yaml")
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


# -- the comparison view ---------------------------------------------------------------------------
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and not all(
        isinstance(v, (int, float, str, bool)) or v is None for v in value
    ):
        return {prefix[:-1]: json.dumps(value)}
    if isinstance(value, list):
        return {prefix[:-1]: ", ".join(significant(v) for v in value)}
    return {prefix[:-1]: value}


def records_table(
    items: Sequence[Mapping[str, Any]], *, name_key: str | None = None, table_id: str | None = None
) -> str:
    flat = [flatten(item) for item in items]
    keys: list[str] = []
    for row in flat:
        keys += [k for k in row if k not in keys]
    if name_key:
        keys = [name_key, *[k for k in keys if k != name_key]]
    return table(keys, ([row.get(k) for k in keys] for row in flat), table_id=table_id)


def json_section(data: Any) -> str:
    """``comparison.json`` rendered without knowing its schema (see the module docstring)."""
    if isinstance(data, list):
        data = {"items": data}
    if not isinstance(data, Mapping):
        return f"<pre>{esc(json.dumps(data, indent=2))}</pre>"
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, (Mapping, list))]
    parts = [table(["key", "value"], scalars, table_id="comparison-meta")] if scalars else []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            parts.append(f"<h3>{esc(key)}</h3>" + records_table(value, table_id=f"comparison-{key}"))
        elif isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            items = [{"name": name, **item} for name, item in value.items()]
            parts.append(
                f"<h3>{esc(key)}</h3>" + records_table(items, name_key="name", table_id=f"comparison-{key}")
            )
        elif isinstance(value, (Mapping, list)):
            parts.append(f"<h3>{esc(key)}</h3><pre>{esc(json.dumps(value, indent=2, default=str))}</pre>")
    return "".join(parts)


def markdown_to_html(text: str) -> str:
    """Enough Markdown for ``comparison.md``: headings, paragraphs, lists, pipe tables, code."""

    def inline(s: str) -> str:
        s = esc(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1", s)  # links become their text: no external URLs

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{esc(chr(10).join(block))}</pre>")
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif line.strip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            i -= 1
            if rows:
                head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
                body = "".join(
                    "<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                item = re.sub(r"^\s*[-*]\s+", "", lines[i])
                items.append(f"<li>{inline(item)}</li>")
                i += 1
            i -= 1
            out.append(f"<ul>{''.join(items)}</ul>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "".join(out)


def _mean_sd(values: list[Any]) -> str:
    """Mean ± sd over the seeds that reported a number."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return formats.mean_sd(*mean_sd(numbers), significant) if numbers else MISSING


def comparison_runs(directory: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((directory / "runs").glob("*/seed-*")):
        summary = _read_json(path / SUMMARY_FILE)
        seed = path.name.removeprefix("seed-")
        runs.append(
            {"arm": path.parent.name, "seed": int(seed) if seed.isdigit() else seed, "summary": summary}
        )
    return runs


def _kd_compare_schema(data: Any) -> bool:
    """Whether ``data`` is the comparison.json ``kd compare`` writes (version 1: arms with names)."""
    arms = data.get("arms") if isinstance(data, Mapping) else None
    return isinstance(arms, list) and bool(arms) and all(isinstance(a, Mapping) and "name" in a for a in arms)


def _rel(path: Any, directory: Path) -> str:
    try:
        return Path(str(path)).resolve().relative_to(directory.resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


def kd_compare_sections(directory: Path, data: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The sections for a ``kd compare`` comparison.json (see :mod:`kdcore.compare`)."""
    arms = data["arms"]
    arm_rows = [
        [
            a.get("name"),
            f"{a.get('role')}, best fixed λ" if a.get("best_fixed") else a.get("role"),
            a.get("strategy"),
            f"{a.get('n_ok', '?')}/{a.get('n_seeds', '?')}",
            a.get("ppl_mean"),
            a.get("ppl_sd"),
            a.get("gap_closed"),
            a.get("mean_lambda"),
            a.get("wall_seconds_mean"),
            a.get("tokens_per_second_mean"),
            a.get("status"),
        ]
        for a in arms
    ]
    arms_html = (
        "<p>Student eval perplexity, mean and standard deviation over seeds (lower is better). "
        "Gap closed = (ppl<sub>CE</sub> − ppl<sub>arm</sub>) / (ppl<sub>CE</sub> − ppl<sub>teacher</sub>).</p>"
        + table(
            [
                "arm",
                "role",
                "strategy",
                "seeds ok",
                "student eval ppl",
                "sd",
                "gap closed",
                "mean λ",
                "wall s",
                "tokens/s",
                "status",
            ],
            arm_rows,
            table_id="arms",
        )
    )
    paired_rows = []
    for a in arms:
        for test in (a.get("vs") or {}).values():
            if isinstance(test, Mapping):
                paired_rows.append(
                    [
                        a.get("name"),
                        test.get("reference"),
                        test.get("n"),
                        test.get("mean_diff"),
                        test.get("ci_low"),
                        test.get("ci_high"),
                        test.get("p_value"),
                        test.get("verdict"),
                    ]
                )
    paired_html = (
        "<p>Δ = arm − reference in eval perplexity, paired over the seeds both finished; negative means the "
        "arm is better. 95% confidence interval and paired t-test.</p>"
        + table(
            ["arm", "reference", "seeds", "Δ ppl", "CI low", "CI high", "p", "verdict"],
            paired_rows,
            table_id="paired",
        )
        if paired_rows
        else "<p>No paired comparison (fewer than two seeds, or no reference finished).</p>"
    )
    run_rows = [
        [
            a.get("name"),
            r.get("seed"),
            r.get("status"),
            r.get("student_eval_ppl"),
            r.get("teacher_eval_ppl"),
            r.get("mean_lambda"),
            r.get("final_open_share"),
            r.get("steps"),
            r.get("wall_seconds"),
            _rel(r.get("run_dir", ""), directory),
        ]
        for a in arms
        for r in a.get("runs") or []
        if isinstance(r, Mapping)
    ]
    runs_html = table(
        [
            "arm",
            "seed",
            "status",
            "student eval ppl",
            "teacher eval ppl",
            "mean λ",
            "open share",
            "steps",
            "wall s",
            "run directory",
        ],
        run_rows,
        table_id="runs",
    )
    teacher, student = data.get("teacher") or {}, data.get("student") or {}
    refs = data.get("references") or {}
    setup_rows = [
        ("teacher", teacher.get("source")),
        ("teacher parameters", teacher.get("params")),
        ("teacher eval perplexity", teacher.get("eval_ppl")),
        ("teacher eval perplexity sd", teacher.get("eval_ppl_sd")),
        ("student", student.get("source")),
        ("student parameters", student.get("params") or teacher.get("student_params")),
        ("seeds", ", ".join(str(s) for s in data.get("seeds") or [])),
        ("teacher seed", data.get("teacher_seed")),
        ("CE reference", refs.get("ce")),
        ("KD reference", refs.get("kd")),
        ("best fixed λ", refs.get("best_fixed")),
        ("created", data.get("created")),
    ]
    setup_rows = [(k, v) for k, v in setup_rows if v not in (None, "")]
    notes = "".join(f"<li>{esc(n)}</li>" for n in data.get("notes") or [])
    command = f"<p>Command:</p><pre>{esc(data['command'])}</pre>" if data.get("command") else ""
    setup_html = (
        table(["setting", "value"], setup_rows, table_id="setup")
        + (f"<ul>{notes}</ul>" if notes else "")
        + command
    )
    base = data.get("base_config")
    if base:
        setup_html += (
            "<h3>Base config (every arm)</h3><pre>" + esc(yaml.safe_dump(base, sort_keys=False)) + "</pre>"
        )
    return [
        ("arms", "Arms", arms_html),
        ("paired", "Paired comparisons", paired_html),
        (
            "plots",
            "Plots",
            "".join(figure(p.read_bytes(), p.stem.replace("_", " ")) for p in sorted(directory.glob("*.png")))
            or "<p>No plots.</p>",
        ),
        ("runs", "Every run", runs_html),
        ("setup", "Set-up", setup_html),
    ]


def build_comparison_report(directory: Path) -> tuple[str, str]:
    data = _read_json(directory / "comparison.json")
    if _kd_compare_schema(data):
        arms = data["arms"]
        seeds = data.get("seeds") or []
        title = f"kdcore comparison: {len(arms)} arms × {len(seeds)} seeds"
        subtitle = f"<code>{esc(directory.resolve())}</code>"
        sections = kd_compare_sections(directory, data)
        if (directory / "comparison.md").is_file():
            md = markdown_to_html((directory / "comparison.md").read_text())
            sections.append(
                (
                    "comparison-md",
                    "comparison.md",
                    f"<details><summary>as written by kd compare</summary>{md}</details>",
                )
            )
        return title, page(title, subtitle, sections)
    runs = comparison_runs(directory)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    title = f"kdcore comparison: {len(arms)} arms" if arms else "kdcore comparison"
    subtitle = f"<code>{esc(directory.resolve())}</code>"
    sections = []
    if runs:
        metrics = ("student_eval_ppl", "teacher_eval_ppl", "mean_lambda", "wall_seconds")
        arm_rows = []
        for arm in arms:
            mine = [r["summary"] for r in runs if r["arm"] == arm and r["summary"]]
            done = sum(1 for r in runs if r["arm"] == arm and r["summary"])
            total = sum(1 for r in runs if r["arm"] == arm)
            arm_rows.append([arm, f"{done}/{total}", *(_mean_sd([s.get(m) for s in mine]) for m in metrics)])
        per_arm = table(
            ["arm", "finished runs", "student eval ppl", "teacher eval ppl", "mean λ", "wall time (s)"],
            arm_rows,
            table_id="arms",
        )
        run_rows = [
            [
                r["arm"],
                r["seed"],
                *((r["summary"] or {}).get(m) for m in metrics),
                "finished" if r["summary"] else "not finished",
            ]
            for r in runs
        ]
        per_run = table(
            ["arm", "seed", "student eval ppl", "teacher eval ppl", "mean λ", "wall time (s)", "status"],
            run_rows,
            table_id="runs",
        )
        sections.append(
            (
                "arms",
                "Arms (from runs/<arm>/seed-<s>/summary.json)",
                "<p>Mean ± standard deviation over seeds.</p>" + per_arm + "<h3>Every run</h3>" + per_run,
            )
        )
    plots = [figure(p.read_bytes(), p.stem.replace("_", " ")) for p in sorted(directory.glob("*.png"))]
    if plots:
        sections.append(("plots", "Plots", "".join(plots)))
    if (directory / "comparison.md").is_file():
        sections.append(
            ("comparison-md", "comparison.md", markdown_to_html((directory / "comparison.md").read_text()))
        )
    if data is not None:
        sections.append(("comparison-json", "comparison.json", json_section(data)))
    if not sections:
        sections.append(("empty", "Nothing yet", "<p>No runs, plots or comparison files were found.</p>"))
    return title, page(title, subtitle, sections)


# -- entry point -----------------------------------------------------------------------------------
def build_report(directory: Path, output: Path | None = None) -> Path:
    """Write the HTML report of a run or comparison directory; returns its path (``DIR/report.html``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KdError(f"'{directory}' is not a directory; pass a run directory or a kd compare directory")
    if is_comparison_dir(directory):
        _, text = build_comparison_report(directory)
    elif is_run_dir(directory):
        _, text = build_run_report(directory)
    else:
        raise KdError(
            f"'{directory}' holds neither a run (summary.json, metrics.jsonl, config.yaml) nor a comparison "
            "(comparison.json, runs/<arm>/seed-<s>/); pass the directory kd run or kd compare wrote"
        )
    target = Path(output) if output else directory / REPORT
    atomic_write_text(target, text)
    return target
