"""How kdcore shows numbers: one family of formatters and one mark for a value that is not known.

Tables that readers compare by eye (``comparison.md``, the console summary) use :func:`fixed` digits;
pages that show raw values (``kd report``, the model card) use :func:`significant` digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

#: What a table shows for a value that is not known (a run that failed, a test with too few seeds).
MISSING = "—"


def fixed(value: float | None, digits: int = 3) -> str:
    """``12.346`` for ``digits=3``; :data:`MISSING` for None."""
    return MISSING if value is None else f"{value:.{digits}f}"


def significant(value: Any, digits: int = 6) -> str:
    """Numbers with ``digits`` significant digits, booleans as ``true``/``false``, the rest as text."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def mean_sd(mean: float | None, sd: float | None, number: Callable[[float], str] = fixed) -> str:
    """``mean ± sd`` (just the mean when there is no sd, e.g. one seed), each written by ``number``."""
    if mean is None:
        return MISSING
    return f"{number(mean)} ± {number(sd)}" if sd is not None else number(mean)


def human_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 KiB``, ..., ``2.0 TiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
