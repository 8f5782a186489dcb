"""Small statistics for comparisons across seeds: mean ± sd and paired differences (the gap closed is
:func:`kdcore.references.gap_closed`).

Everything here is plain numbers in, plain numbers out (no torch), so ``kd compare`` can build its
table in the parent process and the tests can check it against numpy/scipy independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: below this p-value a paired difference is called significant
ALPHA = 0.05


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1); sd is None for fewer than two values."""
    xs = [float(v) for v in values]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


@dataclass
class Paired:
    """A paired comparison ``arm − reference`` over the seeds both finished (lower ppl = better)."""

    reference: str
    n: int
    seeds: list[int]
    mean_diff: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    note: str | None = None  # why there is no test ("n/a: fewer than 2 paired seeds", ...)

    @property
    def significant(self) -> bool | None:
        if self.p_value is None:
            return None
        return self.p_value < ALPHA

    def verdict(self) -> str:
        if self.p_value is None:
            return self.note or "n/a"
        return "significant" if self.significant else "not significant"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict()}


def paired_difference(
    arm: dict[int, float], reference: dict[int, float], reference_name: str, confidence: float = 0.95
) -> Paired:
    """Paired t-test (``scipy.stats.ttest_rel``) of ``arm − reference`` over the seeds in both.

    The confidence interval is ``mean ± t_{n−1, (1+confidence)/2} · sd / √n`` of the per-seed
    differences. With fewer than two common seeds there is no test (``note`` says so); with
    identical differences on every seed (sd = 0) the p-value is undefined and reported as such.
    """
    seeds = sorted(set(arm) & set(reference))
    diffs = [arm[s] - reference[s] for s in seeds]
    result = Paired(reference=reference_name, n=len(seeds), seeds=seeds)
    if not seeds:
        result.note = "n/a: no seed finished for both"
        return result
    mean, sd = mean_sd(diffs)
    result.mean_diff = mean
    if len(seeds) < 2:
        result.note = "n/a: fewer than 2 paired seeds"
        return result
    from scipy import stats

    assert sd is not None and mean is not None
    half = stats.t.ppf((1 + confidence) / 2, len(seeds) - 1) * sd / math.sqrt(len(seeds))
    result.ci_low, result.ci_high = mean - half, mean + half
    if sd == 0:
        result.note = "n/a: the difference is the same on every seed"
        return result
    p = float(stats.ttest_rel([arm[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
    result.p_value = None if math.isnan(p) else p
    if result.p_value is None:
        result.note = "n/a: undefined p-value"
    return result
