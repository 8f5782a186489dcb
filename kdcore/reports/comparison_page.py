"""The page of a comparison directory: for ``kd compare``'s own the tables comparison.md shows (drawn by
:mod:`kdcore.compare.render`), every run and the set-up; for any other, what its files hold."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kdcore import formats
from kdcore.compare.render import arms_table, paired_table
from kdcore.compare.stats import mean_sd
from kdcore.formats import MISSING, significant
from kdcore.reports.page import esc, figure, markdown_cells_table, markdown_to_html, page, read_json, table
from kdcore.summary import SUMMARY_FILE


def is_comparison_dir(directory: Path) -> bool:
    return (directory / "comparison.json").is_file() or any((directory / "runs").glob("*/seed-*"))


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


def _mean_sd(values: list[Any]) -> str:
    """Mean ± sd over the seeds that reported a number."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return formats.mean_sd(*mean_sd(numbers), significant) if numbers else MISSING


def comparison_runs(directory: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((directory / "runs").glob("*/seed-*")):
        summary = read_json(path / SUMMARY_FILE)
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
    """The sections for a ``kd compare`` comparison.json: its arms and paired tables exactly as
    comparison.md has them (:mod:`kdcore.compare.render` draws both), then every run and the set-up."""
    arms_html = (
        "<p>Student eval perplexity, mean ± sd over seeds (lower is better). "
        "Gap closed = (ppl<sub>CE</sub> − ppl<sub>arm</sub>) / (ppl<sub>CE</sub> − ppl<sub>teacher</sub>); "
        "Δ = arm − reference, paired over seeds, mean [95% CI], paired t-test p.</p>"
        + markdown_cells_table(*arms_table(data), table_id="arms")
    )
    headers, paired_rows = paired_table(data)
    paired_html = (
        "<p>Δ = arm − reference in eval perplexity, paired over the seeds both finished; negative means the "
        "arm is better. 95% confidence interval and paired t-test.</p>"
        + markdown_cells_table(headers, paired_rows, table_id="paired")
        if paired_rows
        else "<p>No paired comparison (fewer than two seeds, or no reference finished).</p>"
    )
    plots = "".join(figure(p.read_bytes(), p.stem.replace("_", " ")) for p in sorted(directory.glob("*.png")))
    return [
        ("arms", "Arms", arms_html),
        ("paired", "Paired comparisons", paired_html),
        ("plots", "Plots", plots or "<p>No plots.</p>"),
        ("runs", "Every run", runs_section(directory, data)),
        ("setup", "Set-up", setup_section(data)),
    ]


def runs_section(directory: Path, data: Mapping[str, Any]) -> str:
    """One row per arm and seed, with the run directory relative to the comparison."""
    rows = [
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
        for a in data["arms"]
        for r in a.get("runs") or []
        if isinstance(r, Mapping)
    ]
    headers = [
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
    ]
    return table(headers, rows, table_id="runs")


def setup_section(data: Mapping[str, Any]) -> str:
    """Teacher, student, seeds, references, notes, the command and the base config every arm shares."""
    teacher, student = data.get("teacher") or {}, data.get("student") or {}
    refs = data.get("references") or {}
    rows = [
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
    notes = "".join(f"<li>{esc(n)}</li>" for n in data.get("notes") or [])
    html_ = table(["setting", "value"], [(k, v) for k, v in rows if v not in (None, "")], table_id="setup")
    html_ += f"<ul>{notes}</ul>" if notes else ""
    html_ += f"<p>Command:</p><pre>{esc(data['command'])}</pre>" if data.get("command") else ""
    if data.get("base_config"):
        base = esc(yaml.safe_dump(data["base_config"], sort_keys=False))
        html_ += f"<h3>Base config (every arm)</h3><pre>{base}</pre>"
    return html_


def build_comparison_report(directory: Path) -> tuple[str, str]:
    """(title, HTML) for a comparison directory: kd compare's own, or any tree of runs/<arm>/seed-<s>/."""
    data = read_json(directory / "comparison.json")
    subtitle = f"<code>{esc(directory.resolve())}</code>"
    if _kd_compare_schema(data):
        title = f"kdcore comparison: {len(data['arms'])} arms × {len(data.get('seeds') or [])} seeds"
        sections = kd_compare_sections(directory, data)
        if (directory / "comparison.md").is_file():
            md = markdown_to_html((directory / "comparison.md").read_text())
            details = f"<details><summary>as written by kd compare</summary>{md}</details>"
            sections.append(("comparison-md", "comparison.md", details))
        return title, page(title, subtitle, sections)
    runs = comparison_runs(directory)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    title = f"kdcore comparison: {len(arms)} arms" if arms else "kdcore comparison"
    sections = (
        [("arms", "Arms (from runs/<arm>/seed-<s>/summary.json)", runs_by_arm(runs, arms))] if runs else []
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


def runs_by_arm(runs: list[dict[str, Any]], arms: list[str]) -> str:
    """Per arm the mean ± sd over seeds of the summaries found, then every run."""
    metrics = ("student_eval_ppl", "teacher_eval_ppl", "mean_lambda", "wall_seconds")
    labels = ["student eval ppl", "teacher eval ppl", "mean λ", "wall time (s)"]
    arm_rows = []
    for arm in arms:
        mine = [r["summary"] for r in runs if r["arm"] == arm and r["summary"]]
        total = sum(1 for r in runs if r["arm"] == arm)
        arm_rows.append([arm, f"{len(mine)}/{total}", *(_mean_sd([s.get(m) for s in mine]) for m in metrics)])
    run_rows = [
        [
            r["arm"],
            r["seed"],
            *((r["summary"] or {}).get(m) for m in metrics),
            "finished" if r["summary"] else "not finished",
        ]
        for r in runs
    ]
    return (
        "<p>Mean ± standard deviation over seeds.</p>"
        + table(["arm", "finished runs", *labels], arm_rows, table_id="arms")
        + "<h3>Every run</h3>"
        + table(["arm", "seed", *labels, "status"], run_rows, table_id="runs")
    )
