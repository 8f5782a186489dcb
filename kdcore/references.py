"""The references a distillation is measured against: the CE-only student, vanilla KD, the gap closed.

``kd compare`` adds these arms to a comparison and ``kd run --baseline`` trains the CE-only student
beside a run; both derive them here, from the strategy tree of the run or arm, so that "the CE-only
student" and "the share of the gap closed" mean the same thing wherever they are reported.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def reference_strategy(strategy: Mapping[str, Any], reliance: str) -> dict[str, Any]:
    """``strategy`` (a strategy tree, as in ``config.yaml``) with no scorer, no pacing, no reverse order,
    the dataset's own text as its source and the reliance policy ``reliance``: ``"none"`` is the CE-only student, ``"fixed"`` vanilla KD.

    The divergence, temperature and re-sort interval stay; a kind's parameters stay only when its
    strategy does (vanilla KD keeps a fixed policy's λ, a CE-only student has none).
    """
    out = copy.deepcopy(dict(strategy))
    kinds = (("scorer", "none"), ("pacing", "none"), ("reliance", reliance), ("source", "dataset"))
    for kind, name in kinds:
        current = out.get(kind) or {"name": "none"}
        if isinstance(current, str):
            current = {"name": current}
        params = dict(current.get("params") or {}) if current.get("name") == name else {}
        out[kind] = {"name": name, "params": params}
    out["reverse"] = False
    return out


def gap_closed(ppl_ce: float | None, ppl_arm: float | None, ppl_teacher: float | None) -> float | None:
    """Share of the CE-student-to-teacher gap a student closes: ``(ce − arm) / (ce − teacher)``.

    1 means the student matches the teacher, 0 means no better than CE alone, negative means worse.
    None when an input is missing or the CE student is already at (or below) the teacher.
    """
    if ppl_ce is None or ppl_arm is None or ppl_teacher is None:
        return None
    gap = ppl_ce - ppl_teacher
    if gap <= 0:
        return None
    return (ppl_ce - ppl_arm) / gap
