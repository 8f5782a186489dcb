"""What every kd command shares: the consoles, one-sentence errors, the broken-plugin warning."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from kdcore.errors import KdError

err = Console(stderr=True, soft_wrap=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn a :class:`KdError` into one red sentence and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KdError as exc:
            err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def warn_broken_plugins() -> None:
    """One line when an installed plugin failed to load: its strategies are missing from this run's choices."""
    from kdcore.plugins import get_registry

    broken = [e for e in get_registry().entries if e.status == "broken"]
    if len(broken) == 1:
        line = f"warning: {broken[0].error}; kd list-plugins shows it"
    elif broken:
        names = ", ".join(f"'{e.name}' ({e.distribution})" for e in broken)
        line = f"warning: {len(broken)} installed plugins failed to load: {names}; kd list-plugins shows why"
    else:
        return
    err.print(line, style="yellow", highlight=False, markup=False)


def log(line: str) -> None:
    err.print(line, highlight=False, markup=False)


def offline_hint() -> None:
    """Nothing to do when online; keeps a place for environment checks that must not import torch."""
