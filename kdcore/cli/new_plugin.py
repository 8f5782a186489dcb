"""kd new-plugin: a plugin package for one strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcore.cli.common import friendly_errors, out
from kdcore.cli.options import Opt
from kdcore.scaffold import KIND_CHOICES


@friendly_errors
def new_plugin(
    name: Annotated[str, typer.Argument(help="Strategy name: lower-case letters, digits, dashes.")],
    kind: Annotated[str, Opt(help=f"{', '.join(KIND_CHOICES[:-1])} or {KIND_CHOICES[-1]}.")] = "scorer",
    output_dir: Annotated[Path, Opt(help="Where to write kd-plugin-NAME/.")] = Path("."),
) -> None:
    """Write an installable plugin package kd-plugin-NAME with a working strategy, tests and README."""
    from kdcore.scaffold import write_plugin

    target = write_plugin(name, kind, output_dir)
    steps = [
        f"pip install -e {target}",
        "kd list-plugins",
        f"python -m pytest {target}",
        f"kd run --{kind} {name}",
    ]
    out.print(f"wrote {target}\nnext:\n  " + "\n  ".join(steps), highlight=False, soft_wrap=True)
