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

from pathlib import Path

from kdcore.errors import KdError
from kdcore.files import atomic_write_text, check_output_dir
from kdcore.reports.comparison_page import build_comparison_report, is_comparison_dir
from kdcore.reports.run_page import build_run_report, is_run_dir

__all__ = ["REPORT", "build_report"]

REPORT = "report.html"


# -- entry point -----------------------------------------------------------------------------------
def build_report(directory: Path, output: Path | None = None) -> Path:
    """Write the HTML report of a run or comparison directory; returns its path (``DIR/report.html``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KdError(f"'{directory}' is not a directory; pass a run directory or a kd compare directory")
    target = Path(output) if output else directory / REPORT
    if target.is_dir():
        raise KdError(f"--output '{target}' is a directory; pass the path of the HTML file to write")
    check_output_dir(target.parent, "the directory of --output")
    if is_comparison_dir(directory):
        _, text = build_comparison_report(directory)
    elif is_run_dir(directory):
        _, text = build_run_report(directory)
    else:
        raise KdError(
            f"'{directory}' holds neither a run (summary.json, metrics.jsonl, config.yaml) nor a comparison "
            "(comparison.json, runs/<arm>/seed-<s>/); pass the directory kd run or kd compare wrote"
        )
    atomic_write_text(target, text)
    return target
