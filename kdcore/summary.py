"""A run's summary: the one definition of what ``summary.json`` holds.

The training loop fills the training numbers (:meth:`kdcore.training.engine.Trainer.fit`), the run
adds the rest and writes ``summary.json`` last, atomically, so its presence means the run finished.
``kd compare``, ``kd report`` and the model card read the same fields. A :class:`RunSummary` is
also a read-only mapping (``summary["student_eval_ppl"]``), the shape ``kdcore.run()`` has always
returned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kdcore.files import atomic_write_json

#: The file name, in a run directory.
SUMMARY_FILE = "summary.json"


def _label(text: str) -> dict[str, str]:
    return {"label": text}


@dataclass(kw_only=True)
class RunSummary(Mapping[str, Any]):
    """The numbers and names of one finished run; fields in the order of ``summary.json``, None when
    not known (a summary from the training loop alone, or read from an older file).

    ``label`` (field metadata) is how the run's summary table names a field; fields without one
    are shown elsewhere (the strategy table, the eval curve) or not at all.
    """

    student_eval_ppl: float | None = field(default=None, metadata=_label("student eval perplexity"))
    teacher_eval_ppl: float | None = field(default=None, metadata=_label("teacher eval perplexity"))
    student_initial_eval_ppl: float | None = field(
        default=None, metadata=_label("student eval perplexity before training")
    )
    baseline_eval_ppl: float | None = field(
        default=None, metadata=_label("CE-only student eval perplexity (baseline)")
    )
    gap_closed: float | None = field(default=None, metadata=_label("CE→teacher gap closed"))
    steps: int | None = field(default=None, metadata=_label("steps"))
    tokens_per_second: float | None = field(default=None, metadata=_label("tokens/s"))
    train_tokens: float | None = field(default=None, metadata=_label("training tokens"))
    wall_seconds: float | None = field(default=None, metadata=_label("wall time (s)"))
    mean_lambda: float | None = field(default=None, metadata=_label("mean λ"))
    final_open_share: float | None = field(default=None, metadata=_label("final open share"))
    onpolicy_kl: float | None = field(default=None, metadata=_label("on-policy KL, held out (nats/token)"))
    onpolicy_kl_initial: float | None = field(
        default=None, metadata=_label("on-policy KL before training (nats/token)")
    )
    generation_share: float | None = field(default=None, metadata=_label("share of time generating"))
    difficulty_spearman: float | None = field(
        default=None, metadata=_label("difficulty Spearman (demo levels)")
    )
    strategy: dict[str, str] = field(default_factory=dict)  # kind -> name
    strategy_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> parameters
    teacher: str | None = field(default=None, metadata=_label("teacher"))
    student: str | None = field(default=None, metadata=_label("student"))
    eval_curve: list[list[float]] = field(default_factory=list)  # [step, eval perplexity] pairs
    seed: int | None = field(default=None, metadata=_label("seed"))
    run_dir: str | None = None

    def __post_init__(self) -> None:
        self.eval_curve = [[step, ppl] for step, ppl in self.eval_curve]  # as summary.json holds it

    # -- a read-only mapping of the fields ------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in _NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)

    # -- summary.json ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SUMMARY_FILE
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """The summary in ``data``; keys it does not know (from another kdcore version) are left out."""
        return cls(**{key: value for key, value in data.items() if key in _NAMES})

    @classmethod
    def read(cls, run_dir: Path) -> RunSummary | None:
        """``run_dir/summary.json``, or None when the run has not finished (or the file is unreadable)."""
        try:
            data = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return cls.from_json(data) if isinstance(data, Mapping) else None

    @staticmethod
    def labels() -> dict[str, str]:
        """Field name -> its label in a summary table, in field order."""
        return {f.name: f.metadata["label"] for f in fields(RunSummary) if "label" in f.metadata}


_NAMES = tuple(f.name for f in fields(RunSummary))
