"""kd report: one self-contained HTML page per run or comparison, checked by parsing it (and once in Chromium)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from kdcore.cli import app
from kdcore.compare.render import arms_table, paired_table
from kdcore.config import resolve_config
from kdcore.errors import KdError
from kdcore.reports import build_report
from kdcore.runs.runner import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Title, tables (by id: rows of cell texts), img sources, and every tag and attribute seen."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.title = ""
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self._in_title = False
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]
        attrs = dict(attrs)
        if tag == "title":
            self._in_title = True
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"table-{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)


def assert_self_contained(text: str, page: Page) -> None:
    assert "http://" not in text and "https://" not in text
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for name, value in page.attrs:
        if name in ("src", "href"):
            assert value.startswith(("data:", "#")), (name, value[:80])
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def plain(markdown_cell: str) -> str:
    """The text a reader sees of a Markdown table cell (emphasis and code marks dropped)."""
    return markdown_cell.replace("**", "").replace("`", "")


def body_rows(rows: list[list[str]]) -> list[list[str]]:
    return rows[1:]  # the first row holds the headers


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    overrides = tiny_overrides(
        tmp_path_factory.mktemp("report") / "run",
        **{
            "strategy.scorer.name": "student-snapshot",
            "strategy.pacing.name": "root",
            "training.max_steps": 24,  # 20 steps per epoch: re-sorts at steps 0 and 20
        },
    )
    overrides["strategy.reliance.name"] = "threshold"
    return run(resolve_config(None, overrides), show_progress=False)


@pytest.fixture(scope="module")
def run_page(finished):
    path = build_report(finished.run_dir)
    text = path.read_text()
    return path, text, Page(text)


def test_run_report_is_one_self_contained_file(finished, run_page):
    path, text, page = run_page
    assert path == finished.run_dir / "report.html"
    assert page.title == "kdcore run: student-snapshot / root / threshold"
    assert_self_contained(text, page)
    # the run's own plots and the two drawn from difficulty.parquet
    assert len(page.images) >= 4


def test_summary_table_equals_summary_json(finished, run_page):
    _, _, page = run_page
    summary = json.loads((finished.run_dir / "summary.json").read_text())
    rows = dict(body_rows(page.tables["summary"]))
    for label, key in (
        ("teacher eval perplexity", "teacher_eval_ppl"),
        ("student eval perplexity", "student_eval_ppl"),
        ("student eval perplexity before training", "student_initial_eval_ppl"),
        ("steps", "steps"),
        ("training tokens", "train_tokens"),
        ("tokens/s", "tokens_per_second"),
        ("wall time (s)", "wall_seconds"),
        ("mean λ", "mean_lambda"),
        ("final open share", "final_open_share"),
        ("difficulty Spearman (demo levels)", "difficulty_spearman"),
    ):
        assert float(rows[label]) == pytest.approx(summary[key], rel=1e-5), label
    assert rows["teacher"] == summary["teacher"] and rows["student"] == summary["student"]


def test_strategy_history_metrics_and_config_are_shown(finished, run_page):
    _, text, page = run_page
    strategy = {row[0]: row for row in body_rows(page.tables["strategy"])}
    assert strategy["scorer"][1] == "student-snapshot" and strategy["pacing"][1] == "root"
    assert "lambda_hard=0.9" in strategy["reliance"][2]
    # one row per re-sort in difficulty.parquet, with its mean λ
    history = pq.read_table(finished.run_dir / "difficulty.parquet").to_pandas()
    rows = body_rows(page.tables["difficulty-history"])
    assert [int(r[0]) for r in rows] == sorted(history["step"].unique().tolist())
    assert len(rows) == 8  # 24 steps, re-sorted every tenth of training (3 steps)
    for row in rows:
        lam = history[history["step"] == int(row[0])]["lambda"]
        assert float(row[9]) == pytest.approx(lam.mean(), rel=1e-5)
    # mean λ and open share per logged step, as in metrics.jsonl
    records = [json.loads(line) for line in (finished.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    log = body_rows(page.tables["train-log"])
    assert [int(r[0]) for r in log] == [r["step"] for r in train]
    header = page.tables["train-log"][0]
    for row, record in zip(log, train, strict=True):
        assert float(row[header.index("mean λ")]) == pytest.approx(record["lambda"], rel=1e-5)
        assert float(row[header.index("open share")]) == pytest.approx(record["open_share"], rel=1e-5)
    assert "training:" in text and "max_steps: 24" in text  # the resolved config


def test_kd_report_command(finished, tmp_path):
    target = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", str(finished.run_dir), "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file() and str(target) in result.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "neither a run" in bad.output


def kd_compare_json(run_dir):
    """A comparison.json in kd compare's shape (kdcore/compare/results.py, version 1), around one real run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    run_entry = {
        "seed": 0,
        "status": "ok",
        "run_dir": "RUN",
        "error": None,
        **{
            k: summary[k]
            for k in ("student_eval_ppl", "teacher_eval_ppl", "mean_lambda", "wall_seconds", "steps")
        },
    }
    paired = {"reference": "kd", "n": 1, "seeds": [0], "mean_diff": -1.25, "ci_low": None, "ci_high": None}
    return {
        "version": 1,
        "seeds": [0],
        "command": "kd compare --arm cl=scorer:student-snapshot",
        "notes": ["added arm 'kd'"],
        "teacher": {
            "source": summary["teacher"],
            "eval_ppl": summary["teacher_eval_ppl"],
            "eval_ppl_sd": None,
        },
        "student": {"source": summary["student"], "params": 1234},
        "base_config": {"training": {"max_steps": 24}},
        "references": {"ce": "ce", "kd": "kd", "best_fixed": "kd"},
        "arms": [
            {
                "name": "cl",
                "role": "arm",
                "strategy": "scorer:student-snapshot",
                "status": "ok",
                "n_ok": 1,
                "n_seeds": 1,
                "ppl_mean": summary["student_eval_ppl"],
                "ppl_sd": None,
                "gap_closed": 0.25,
                "mean_lambda": summary["mean_lambda"],
                "wall_seconds_mean": summary["wall_seconds"],
                "tokens_per_second_mean": summary["tokens_per_second"],
                "runs": [{**run_entry, "run_dir": "runs/cl/seed-0"}],
                "vs": {"kd": {**paired, "p_value": None, "verdict": "n/a: fewer than 2 paired seeds"}},
            },
            {
                "name": "kd",
                "role": "kd",
                "strategy": "reliance:fixed",
                "status": "ok",
                "n_ok": 1,
                "n_seeds": 1,
                "ppl_mean": summary["student_eval_ppl"] + 1.25,
                "ppl_sd": None,
                "gap_closed": 0.125,
                "mean_lambda": 0.5,
                "wall_seconds_mean": 1.0,
                "tokens_per_second_mean": 1000.0,
                "runs": [{**run_entry, "run_dir": "runs/kd/seed-0"}],
                "vs": {},
                "best_fixed": True,
            },
        ],
    }


def test_comparison_report_reads_kd_compare_output(finished, tmp_path):
    directory = tmp_path / "comparison"
    for arm in ("cl", "kd"):
        shutil.copytree(finished.run_dir, directory / "runs" / arm / "seed-0")
    data = kd_compare_json(finished.run_dir)
    (directory / "comparison.json").write_text(json.dumps(data))
    (directory / "comparison.md").write_text("# kd compare\n\n| arm | ppl |\n|---|---|\n| cl | 1 |\n")
    shutil.copy(finished.run_dir / "loss.png", directory / "ppl.png")
    text = build_report(directory).read_text()
    page = Page(text)
    assert page.title == "kdcore comparison: 2 arms × 1 seeds"
    assert_self_contained(text, page)
    # the arms and paired tables are comparison.md's, cell for cell (Markdown emphasis rendered as HTML)
    for table_id, (headers, rows) in (("arms", arms_table(data)), ("paired", paired_table(data))):
        assert page.tables[table_id] == [list(headers), *([plain(cell) for cell in row] for row in rows)]
    arms = {row[0]: row for row in body_rows(page.tables["arms"])}
    header = page.tables["arms"][0]
    for arm in data["arms"]:
        row = arms[arm["name"]]
        assert row[header.index("student ppl")] == f"{arm['ppl_mean']:.3f}"
        assert row[header.index("gap closed")] == f"{arm['gap_closed']:.1%}"
        assert row[header.index("mean λ")] == f"{arm['mean_lambda']:.3f}"
    assert "best fixed λ" in arms["kd"][1]
    (paired,) = body_rows(page.tables["paired"])
    assert paired[:4] == ["cl", "kd", "1", "-1.250"]
    runs = body_rows(page.tables["runs"])
    assert [(r[0], r[1], r[9]) for r in runs] == [
        ("cl", "0", "runs/cl/seed-0"),
        ("kd", "0", "runs/kd/seed-0"),
    ]


def test_comparison_without_comparison_json_uses_the_run_summaries(finished, tmp_path):
    directory = tmp_path / "partial"
    shutil.copytree(finished.run_dir, directory / "runs" / "cl" / "seed-0")
    shutil.copytree(finished.run_dir, directory / "runs" / "cl" / "seed-1")
    (directory / "runs" / "cl" / "seed-1" / "summary.json").unlink()  # still running
    page = Page(build_report(directory).read_text())
    (arm,) = body_rows(page.tables["arms"])
    assert arm[:3] == ["cl", "1/2", f"{finished.summary['student_eval_ppl']:.6g}"]


def test_a_directory_that_is_neither_fails_in_one_sentence(tmp_path):
    with pytest.raises(KdError, match="neither a run"):
        build_report(tmp_path)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_page, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    path, _, _ = run_page
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    dark = sum(image.histogram()[:128])  # pixels darker than mid-grey: text, tables, plots
    assert dark > 0.01 * image.size[0] * image.size[1], "the page rendered (almost) blank"
