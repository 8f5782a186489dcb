"""kd report: one self-contained HTML page for a run or a comparison directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcore.cli.common import friendly_errors, out
from kdcore.cli.options import Opt


@friendly_errors
def report(
    directory: Annotated[
        Path, typer.Argument(help="A run directory (kd run) or a comparison directory (kd compare).")
    ],
    output: Annotated[
        Path | None, Opt("--output", "-o", help="Where to write the page (default DIR/report.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML page (plots, tables, config) for a run or a comparison, readable offline."""
    from kdcore.reports import build_report

    out.print(f"wrote {build_report(directory, output)}", highlight=False, soft_wrap=True)
