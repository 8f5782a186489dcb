"""The ``kd`` command line: the typer app, one module per command. Start-up stays fast: torch and
transformers load only inside commands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kdcore import __version__
from kdcore.cli import cache_teacher, compare, list_plugins, new_plugin, report, run, train_teacher
from kdcore.cli.common import out

app = typer.Typer(
    name="kd",
    help="Knowledge distillation for language models with curriculum learning and selective reliance.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"kdcore {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """kd: distil a student language model from a teacher, with pluggable strategies."""


app.command(cls=run.RunCommand)(run.run)
app.command("train-teacher")(train_teacher.train_teacher)
app.command("cache-teacher")(cache_teacher.cache_teacher)
app.command("list-plugins")(list_plugins.list_plugins)
app.command("new-plugin")(new_plugin.new_plugin)
app.command("report")(report.report)
app.command("compare")(compare.compare)


def main() -> None:
    app(prog_name="kd")  # also under python -m kdcore: usage lines and completion scripts name `kd`


if __name__ == "__main__":
    sys.exit(main())
