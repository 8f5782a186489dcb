"""kd list-plugins: every installed strategy and its status."""

from __future__ import annotations

import json
from typing import Annotated

from rich.table import Table

from kdcore.cli.common import friendly_errors, out
from kdcore.cli.options import Opt
from kdcore.strategies import KINDS


@friendly_errors
def list_plugins(
    as_json: Annotated[bool, Opt("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List every installed strategy: kind, name, description, providing package, status."""
    from kdcore.plugins import get_registry

    entries = get_registry().entries
    if as_json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return
    table = Table(title="kdcore plugins")
    for column in ("kind", "name", "description", "distribution", "status"):
        table.add_column(column, overflow="fold")
    order = {kind: i for i, kind in enumerate(KINDS)}  # the plugins that failed to load come last
    for e in sorted(entries, key=lambda e: (order.get(e.kind, len(order)), e.name)):
        status = "[green]ok[/green]" if e.status == "ok" else f"[red]{e.status}[/red]: {e.error}"
        table.add_row(e.kind, e.name, e.description, f"{e.distribution} {e.version}", status)
    out.print(table)
