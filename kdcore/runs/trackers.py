"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through accelerate's integrations.

``output.report_to`` (``kd run --report-to``) names the tracker, ``all`` every one installed, ``none``
(the default) nothing. The run's :class:`~kdcore.training.engine.Trainer` creates its ``Accelerator`` with
``log_with`` and ``project_dir=run_dir``; :class:`Tracking` then calls ``init_trackers`` with the
resolved config flattened into hyper-parameters, sends every metrics record to ``accelerator.log``
and closes the trackers with ``end_training``. Metric names:

- ``loss``, ``ce``, ``kd`` → ``train/loss``, ``train/ce``, ``train/kd``
- ``lambda`` (mean λ over the log window) → ``train/lambda``
- ``open_share``, ``lr``, ``tokens_per_second`` → ``train/open_share``, ``train/lr``, ``train/tokens_per_second``
- ``eval_ppl`` (the student's) → ``eval/perplexity``
- ``grad_norm`` (the gradient norm before clipping) → ``train/grad_norm``
- the teacher's eval perplexity → ``eval/teacher_perplexity`` (at step 0)

Where the data goes: TensorBoard event files in ``RUN_DIR/<tracker_project>/`` (default
``RUN_DIR/kdcore/``, so ``tensorboard --logdir runs/`` shows every run); wandb's files in ``RUN_DIR/wandb/``
(the run is named after the run directory; ``WANDB_MODE=offline`` works as usual); MLflow wherever
``MLFLOW_TRACKING_URI`` points (its default otherwise), run named after the run directory.

Each tracker is an optional extra: ``pip install "kdcore[tensorboard]"`` (or ``wandb``, ``mlflow``).
Asking for one that is not installed fails before anything runs, with that command.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdcore.errors import KdError

#: tracker name -> the modules any of which makes it usable (accelerate falls back to tensorboardX)
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}

#: metrics.jsonl key -> tracker scalar name; other numeric keys become ``train/<key>``
METRIC_NAMES = {
    "loss": "train/loss",
    "ce": "train/ce",
    "kd": "train/kd",
    "lambda": "train/lambda",
    "open_share": "train/open_share",
    "lr": "train/lr",
    "tokens_per_second": "train/tokens_per_second",
    "grad_norm": "train/grad_norm",
    "eval_ppl": "eval/perplexity",
}


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(module) is not None for module in TRACKERS[name])


def resolve_trackers(report_to: str) -> list[str]:
    """The tracker names for ``report_to``; a KdError naming the pip command when one is missing."""
    if report_to in ("none", "", None):
        return []
    if report_to == "all":
        names = [name for name in TRACKERS if installed(name)]
        if not names:
            raise KdError(
                "--report-to all found no experiment tracker installed; "
                'install one, e.g. pip install "kdcore[tensorboard]"'
            )
        return names
    if report_to not in TRACKERS:
        raise KdError(f"unknown tracker '{report_to}'; use one of tensorboard, wandb, mlflow, all, none")
    if not installed(report_to):
        raise KdError(
            f"--report-to {report_to} needs the {report_to} package, which is not installed; "
            f'run pip install "kdcore[{report_to}]"'
        )
    return [report_to]


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{'training': {'lr': 0.003}}`` -> ``{'training.lr': 0.003}``, with values every tracker takes.

    None becomes ``"null"`` and lists become their JSON text (TensorBoard's hparams accept only
    bool, int, float and str).
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def tracker_values(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars (the ``step`` is passed separately)."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[METRIC_NAMES.get(key, f"train/{key}")] = float(value)
    return values


class Tracking:
    """The trackers of one run; every method is a no-op when ``report_to`` is ``none``."""

    def __init__(self, report_to: str, run_dir: Path, project: str = "kdcore") -> None:
        self.names = resolve_trackers(report_to)
        self.run_dir = Path(run_dir)
        self.project = project
        self.accelerator: Any = None

    @property
    def log_with(self) -> list[str] | None:
        """For ``Accelerator(log_with=...)``."""
        return self.names or None

    @property
    def project_dir(self) -> Path | None:
        """For ``Accelerator(project_dir=...)``: the run directory."""
        return self.run_dir if self.names else None

    def start(self, accelerator: Any, config: Mapping[str, Any], **initial: float) -> None:
        """``init_trackers`` with the flattened config as hyper-parameters; logs ``initial`` at step 0."""
        if not self.names:
            return
        self.accelerator = accelerator
        init_kwargs = {
            "wandb": {"dir": str(self.run_dir), "name": self.run_dir.name},
            "mlflow": {"run_name": self.run_dir.name},
        }
        accelerator.init_trackers(
            self.project,
            config=flatten_hparams(config),
            init_kwargs={name: kw for name, kw in init_kwargs.items() if name in self.names},
        )
        if initial:
            accelerator.log({f"eval/{key}": float(value) for key, value in initial.items()}, step=0)

    def log(self, record: Mapping[str, Any]) -> None:
        if self.accelerator is None:
            return
        values = tracker_values(record)
        if values:
            self.accelerator.log(values, step=int(record["step"]))

    def wrap(self, on_log: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """An ``on_log`` callback that calls ``on_log`` and then logs the record to the trackers."""

        def both(record: dict[str, Any]) -> None:
            on_log(record)
            self.log(record)

        return both

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None
