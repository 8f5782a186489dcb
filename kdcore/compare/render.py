"""``comparison.md`` and the comparison plots, from the numbers of ``comparison.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore.compare import stats
from kdcore.formats import MISSING, fixed, mean_sd


def format_paired(p: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not p or p.get("mean_diff") is None:
        return (p or {}).get("note") or MISSING
    text = f"{p['mean_diff']:+.{digits}f}"
    if p.get("ci_low") is not None:
        text += f" [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}]"
    if p.get("p_value") is not None:
        text += f", p={p['p_value']:.3g} {p['verdict']}"
    else:
        text += f" ({p.get('note') or 'n/a'})"
    return text


ROLE_LABEL = {
    "ce": "CE-only reference",
    "kd": "vanilla KD reference",
    "sweep": "fixed-λ sweep",
    "matched": "matched-λ baseline",
    "equal-time": "at the kd arm's training time",
    "arm": "arm",
}


def role_text(row: Mapping[str, Any]) -> str:
    text = ROLE_LABEL.get(row["role"], row["role"])
    if row["role"] == "matched":
        text += f" of {row['matched_to']}"
    if row["role"] == "equal-time" and row.get("steps_mean") is not None:
        text = f"{row['timed_to']} {text} ({row['steps_mean']:.0f} steps)"
    if row["role"] == "kd" and row.get("fixed_lambda") is not None:
        text += f" (λ={row['fixed_lambda']:g})"
    if row.get("best_fixed"):
        text += ", **best fixed λ**"
    if row.get("auto"):
        text += " (added)"
    return text


def render_markdown(data: Mapping[str, Any]) -> str:
    """comparison.md: the set-up, the table of arms, the paired comparisons and plain verdicts."""
    lines = ["# kd compare", "", *setup_lines(data)]
    lines += [
        "",
        "Student eval perplexity, mean ± sd over seeds (lower is better). Gap closed = "
        "(ppl_ce − ppl_arm)/(ppl_ce − ppl_teacher) on the means over the seeds both finished. Δ = arm − reference, paired over seeds, "
        "mean [95% CI], paired t-test p; negative Δ means the arm is better. On-policy KL = the teacher's mean "
        "KL(student ‖ teacher) per token on the student's greedy continuations of held-out prompts (nats, lower is "
        "better); gen. = share of training time spent generating; train s = training time per run.",
        "",
        *markdown_table(*arms_table(data)),
    ]
    paired = paired_table(data)
    if paired[1]:
        lines += ["", "## Paired comparisons", "", *markdown_table(*paired)]
    lines += ["", verdict_sentences(data), ""]
    return "\n".join(lines)


def setup_lines(data: Mapping[str, Any]) -> list[str]:
    """The list above the table: teacher, student, data, training, command, completeness, wall time, notes."""
    t, st = data["teacher"], data["student"]
    base = data["base_config"]
    teacher_params = f", {t['params']:,} parameters" if t.get("params") else ""
    student_params = f", {st['params']:,} parameters" if st.get("params") else ""
    lines = [
        f"- teacher: `{t['source']}`{teacher_params}, eval ppl {fixed(t.get('eval_ppl'))}"
        f" (trained once, teacher seed {data['teacher_seed']}; `{t.get('dir')}`)",
        f"- student: `{st['source']}`{student_params}",
        f"- data: `{base['data']['dataset']}`, eval `{base['data'].get('eval_dataset') or 'held-out tail'}`, "
        f"seq len {base['data']['seq_len']}, max eval samples {base['data'].get('max_eval_samples')}",
        f"- training (every arm): {base['training']['max_steps']} steps × batch {base['training']['batch_size']}, "
        f"lr {base['training']['lr']:g}, seeds {', '.join(map(str, data['seeds']))}",
    ]
    if data.get("command"):
        lines.append(f"- command: `{data['command']}`")
    if data.get("runs_planned") and data.get("runs_finished") != data["runs_planned"]:
        rebuilt = (
            " (table rebuilt from the finished runs only, nothing was run)" if data.get("table_only") else ""
        )
        lines.append(
            f"- **incomplete**: {data['runs_finished']} of {data['runs_planned']} runs finished{rebuilt}"
        )
    if data.get("wall_seconds") is not None:
        extra = [
            f"{label} {t[key] / 60:.1f} min"
            for key, label in (("resolve_seconds", "teacher training"), ("cache_seconds", "teacher cache"))
            if (t.get(key) or 0) > 1
        ]
        lines.append(
            f"- wall time of this invocation: {data['wall_seconds'] / 60:.1f} min with --jobs {data.get('jobs', 1)}"
            + (f" ({', '.join(extra)})" if extra else "")
        )
    lines += [f"- note: {note}" for note in data.get("notes") or []]
    return lines


#: The columns of the table of arms (comparison.md and ``kd report``'s comparison page).
ARM_COLUMNS = (
    "arm",
    "role",
    "strategy",
    "seeds",
    "student ppl",
    "on-policy KL",
    "gap closed",
    "mean λ",
    "Δ vs kd",
    "Δ vs matched λ",
    "gen.",
    "train s",
    "wall s",
    "tokens/s",
    "status",
)
PAIRED_COLUMNS = ("arm", "reference", "seeds", "Δ ppl (arm − ref)", "95% CI", "p (paired t)", "verdict")


def arms_table(data: Mapping[str, Any]) -> tuple[Sequence[str], list[list[str]]]:
    """One row per arm, cells as inline Markdown (``**bold**``, ``code``)."""
    rows = []
    for row in data["arms"]:
        vs = row.get("vs") or {}
        status = row["status"] + (f": {row['error']}" if row.get("error") else "")
        gap = row.get("gap_closed")
        rows.append(
            [
                f"**{row['name']}**",
                role_text(row),
                f"`{row['strategy']}`",
                f"{row['n_ok']}/{row['n_seeds']}",
                mean_sd(row.get("ppl_mean"), row.get("ppl_sd")),
                mean_sd(row.get("onpolicy_kl_mean"), row.get("onpolicy_kl_sd"), lambda x: fixed(x, 4)),
                MISSING if gap is None else f"{gap:.1%}",
                mean_sd(row.get("mean_lambda"), row.get("mean_lambda_sd")),
                format_paired(vs["kd"]) if "kd" in vs else MISSING,
                format_paired(vs.get("matched")) if "matched" in vs else MISSING,
                MISSING
                if row.get("generation_share_mean") is None
                else f"{row['generation_share_mean']:.0%}",
                fixed(row.get("train_seconds_mean"), 0),
                fixed(row.get("wall_seconds_mean"), 0),
                fixed(row.get("tokens_per_second_mean"), 0),
                status.replace("|", "/"),
            ]
        )
    return ARM_COLUMNS, rows


def paired_table(data: Mapping[str, Any]) -> tuple[Sequence[str], list[list[str]]]:
    """One row per paired test of an arm (references and baselines are what arms are compared with)."""
    rows = []
    for row in data["arms"]:
        if row["role"] not in ("arm", "equal-time"):
            continue
        for p in (row.get("vs") or {}).values():
            ci = MISSING if p.get("ci_low") is None else f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
            rows.append(
                [
                    row["name"],
                    p["reference"],
                    str(p["n"]),
                    MISSING if p.get("mean_diff") is None else format(p["mean_diff"], "+.3f"),
                    ci,
                    MISSING if p.get("p_value") is None else format(p["p_value"], ".3g"),
                    p["verdict"],
                ]
            )
    return PAIRED_COLUMNS, rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def verdict_sentences(data: Mapping[str, Any]) -> str:
    """Plain sentences: which arms beat vanilla KD and their matched baseline, significantly or not."""
    out = []
    for row in data["arms"]:
        if row["role"] not in ("arm", "equal-time"):
            continue
        for key, label in (
            ("kd", "vanilla KD"),
            ("matched", "KD at its matched mean λ"),
            ("best_fixed", "the best fixed λ"),
        ):
            p = (row.get("vs") or {}).get(key)
            if not p or p.get("mean_diff") is None:
                continue
            better = "lower" if p["mean_diff"] < 0 else "higher"
            if p.get("p_value") is None:
                tail = f"({p.get('note')})"
            elif p["p_value"] < 0.05:
                tail = f"(p={p['p_value']:.3g}, significant)"
            else:
                tail = f"(p={p['p_value']:.3g}, not significant)"
            out.append(
                f"- **{row['name']}** vs {label} (`{p['reference']}`): {abs(p['mean_diff']):.3f} {better} ppl {tail}."
            )
    return "\n".join(out)


def write_comparison_plots(out_dir: Path, data: Mapping[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kdcore.runs.outputs import save_figure

    rows = [r for r in data["arms"] if r["ppl_mean"] is not None]
    written = []
    if not rows:
        return written
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.8))
    xs = np.arange(len(rows))
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for x, row, color in zip(xs, rows, colors, strict=True):
        ax.errorbar(x, row["ppl_mean"], yerr=row["ppl_sd"] or 0, fmt="o", capsize=4, color=color)
        seeds = [r["student_eval_ppl"] for r in row["runs"] if r["status"] == "ok"]
        ax.scatter([x + 0.12] * len(seeds), seeds, s=8, color=color, alpha=0.5)
    teacher = data["teacher"].get("eval_ppl")
    if teacher:
        ax.axhline(teacher, ls="--", color="grey", lw=1, label=f"teacher {teacher:.3f}")
        ax.legend(fontsize="small")
    ax.set_xticks(xs, [r["name"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="student eval perplexity", title="eval perplexity per arm (mean ± sd over seeds)")
    path = out_dir / "ppl.png"
    save_figure(fig, path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row, color in zip(rows, colors, strict=True):
        curves = [r["eval_curve"] for r in row["runs"] if r["status"] == "ok" and r.get("eval_curve")]
        if not curves:
            continue
        steps = [step for step, _ in curves[0]]
        common = [c for c in curves if [s for s, _ in c] == steps]
        values = np.array([[v for _, v in c] for c in common], dtype=float)
        if len(steps) > 2:  # the untrained model's perplexity (step 0) would flatten every difference
            steps, values = steps[1:], values[:, 1:]
        band = [stats.mean_sd(column) for column in values.T]  # mean and sd over seeds, at each step
        mean = np.array([m for m, _ in band])
        sd = np.array([d or 0.0 for _, d in band])
        style = "--" if row["role"] in ("sweep", "matched") else "-"
        ax.plot(steps, mean, style, color=color, label=row["name"], lw=1.3)
        ax.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.15)
    if teacher:
        ax.axhline(teacher, ls=":", color="grey", lw=1, label="teacher")
    ax.set(
        xlabel="step",
        ylabel="eval perplexity",
        title="eval curves (mean ± sd over seeds; step 0 left out)",
    )
    ax.legend(fontsize="x-small", ncol=2)
    path = out_dir / "curves.png"
    save_figure(fig, path)
    plt.close(fig)
    written.append(path)
    return written
