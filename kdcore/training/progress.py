"""The training progress bar: steps done, the latest loss, mean λ and open share."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """A rich progress bar with the latest loss; silent when ``console`` is None."""

    def __init__(self, console: Console | None, total: int, label: str) -> None:
        self.console, self.total, self.label = console, total, label
        self.progress: Progress | None = None
        self.task: TaskID | None = None  # the bar, once started

    def __enter__(self) -> TrainingProgress:
        if self.console is not None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, info="")
        return self

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        info = f"loss {metrics.get('loss', float('nan')):.3f}  λ {metrics.get('lambda', 0):.2f}"
        if metrics.get("open_share", 1.0) < 1.0:
            info += f"  open {metrics['open_share']:.0%}"
        self.progress.update(self.task, completed=step, info=info)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
