"""Pacing functions: the share of the easy-to-hard ordering open at each step.

Every pacing maps ``(step, total_steps)`` to a share in ``(0, 1]`` and, for every parameter value
it accepts, is

- monotone non-decreasing in ``step``;
- equal to its starting share at step 0 (``s0``; ``1/k`` for ``step``; the first point's share
  for ``points``);
- equal to 1 from ``total_steps`` on (and, for the ramped ones, from ``ramp · total_steps`` on).

Notation: ``t = step / total_steps`` (clamped to ``[0, 1]``) and ``p = min(1, t / ramp)``, the
progress through the ramp. ``total_steps <= 0`` counts as "training is over": everything is open.
"""

from __future__ import annotations

import bisect
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdcore import PacingFunction, hookimpl


def _t(step: int, total_steps: int) -> float:
    """Training progress ``step / total_steps`` clamped to ``[0, 1]``."""
    if total_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / total_steps))


def _ramp_progress(step: int, total_steps: int, ramp: float) -> float:
    """``p = min(1, t / ramp)``: how far through the ramp ``step`` is."""
    t = _t(step, total_steps)
    return 1.0 if t >= ramp else min(1.0, t / ramp)


class NoPacing(PacingFunction):
    """Everything open from the first step: plain shuffled epochs."""

    def fraction(self, step: int, total_steps: int) -> float:
        return 1.0


# --------------------------------------------------------------------------------------------
# Ramped pacings: start at s0 and open everything at ramp · total_steps
# --------------------------------------------------------------------------------------------


class RampParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s0: float = Field(0.2, gt=0, le=1, description="share of the easiest samples open at step 0")
    ramp: float = Field(0.8, gt=0, le=1, description="share of training after which everything is open")


class Linear(PacingFunction):
    """Linear: s0 + (1−s0)·min(1, t/ramp)."""

    Params = RampParams

    def fraction(self, step: int, total_steps: int) -> float:
        p = _ramp_progress(step, total_steps, self.params.ramp)
        if p >= 1.0:
            return 1.0
        s0 = self.params.s0
        return min(1.0, s0 + (1.0 - s0) * p)


class Root(PacingFunction):
    """Competence-based square root (Platanios et al. 2019): sqrt(s0² + (1−s0²)·min(1, t/ramp))."""

    Params = RampParams

    def fraction(self, step: int, total_steps: int) -> float:
        p = _ramp_progress(step, total_steps, self.params.ramp)
        if p >= 1.0:
            return 1.0
        s0 = self.params.s0
        # hypot(s0, sqrt(x)) = sqrt(s0² + x) without s0² underflowing for tiny s0; exact at p = 0.
        return min(1.0, math.hypot(s0, math.sqrt((1.0 - s0 * s0) * p)))


class Geometric(PacingFunction):
    """Geometric: s0^(1−min(1, t/ramp)), multiplying the open share by a constant factor per step."""

    Params = RampParams

    def fraction(self, step: int, total_steps: int) -> float:
        p = _ramp_progress(step, total_steps, self.params.ramp)
        if p >= 1.0:
            return 1.0
        return min(1.0, self.params.s0 ** (1.0 - p))


class ExponentialParams(RampParams):
    growth: float = Field(2.0, gt=1, le=1000, description="factor the open share grows by at each stage")
    step_length: int | None = Field(
        None,
        ge=1,
        description=(
            "training steps per stage; null: ramp·total_steps / n, where n = ⌈log(1/s0)/log(growth)⌉ "
            "stages take s0 to 1, so the last stage opens at ramp·total_steps"
        ),
    )


class Exponential(PacingFunction):
    """Fixed exponential pacing (Hacohen & Weinshall 2019): min(1, s0·growth^⌊step/step_length⌋).

    With ``step_length`` unset, ``n = ⌈log(1/s0) / log(growth)⌉`` stages are needed to reach 1 and
    each lasts ``ramp · total_steps / n`` steps (possibly fractional), so the share reaches 1 at
    ``ramp · total_steps``. With an explicit ``step_length`` the ramp still caps it: everything is
    open from ``ramp · total_steps`` on even if the stages would not have got there yet.
    """

    Params = ExponentialParams

    def stages(self) -> int:
        """``n``: the number of growth stages that take ``s0`` to 1."""
        s0, growth = self.params.s0, self.params.growth
        if s0 >= 1.0:
            return 0
        # the tolerance keeps e.g. s0 = 0.25, growth = 2 at exactly 2 stages despite rounding
        return max(1, math.ceil(-math.log(s0) / math.log(growth) - 1e-9))

    def fraction(self, step: int, total_steps: int) -> float:
        s0, growth = self.params.s0, self.params.growth
        p = _ramp_progress(step, total_steps, self.params.ramp)
        n = self.stages()
        if p >= 1.0 or n == 0:
            return 1.0
        if step <= 0:
            return s0
        length = self.params.step_length or self.params.ramp * total_steps / n
        stage = step / length + 1e-9 if length > 0 else math.inf  # a boundary on a whole step opens at it
        if stage >= n:
            return 1.0
        k = math.floor(stage)
        if k == 0:
            return s0
        try:
            value = s0 * growth**k
        except OverflowError:  # only for a subnormal s0
            value = math.exp(math.log(s0) + k * math.log(growth))
        return min(1.0, max(s0, value))


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(4, ge=1, le=10_000, description="number of equal difficulty buckets")
    ramp: float = Field(0.8, gt=0, le=1, description="share of training over which the buckets open")


class Step(PacingFunction):
    """Baby steps: k equal buckets opened one at a time over the ramp: min(1, (1+⌊k·t/ramp⌋)/k).

    The first bucket (share ``1/k``) is open at step 0; bucket ``j`` opens at
    ``t = ramp · (j − 1) / k``, so the last one opens at ``ramp · (k − 1) / k``.
    """

    Params = StepParams

    def fraction(self, step: int, total_steps: int) -> float:
        k = self.params.k
        p = _ramp_progress(step, total_steps, self.params.ramp)
        if p >= 1.0:
            return 1.0
        # step·k / (ramp·total) rather than p·k, plus a hair of tolerance, so that a bucket
        # boundary that falls on a whole step (0.6 / 0.8 · 4 = 2.9999…) opens at that step
        opened = math.floor(max(step, 0) * k / (self.params.ramp * total_steps) + 1e-9)
        return min(1.0, (1 + min(opened, k)) / k)


class PointsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.0, 0.2), (0.8, 1.0)],
        min_length=1,
        description=(
            "(x, share) points, x sorted ascending and shares non-decreasing in (0, 1], the last share "
            "1; interpolated linearly, flat before the first point and 1 after the last"
        ),
    )
    unit: Literal["progress", "step"] = Field(
        "progress", description="what x counts: share of training (0..1) or training steps"
    )

    @field_validator("points")
    @classmethod
    def _check_points(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for i, (x, share) in enumerate(points):
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"point {i}: x must be a finite number ≥ 0, got {x}")
            if not (0 < share <= 1):
                raise ValueError(f"point {i}: share must be in (0, 1], got {share}")
        for i in range(1, len(points)):
            if points[i][0] < points[i - 1][0]:
                raise ValueError(
                    f"x must be sorted ascending, but point {i} has x={points[i][0]} "
                    f"after x={points[i - 1][0]}"
                )
            if points[i][1] < points[i - 1][1]:
                raise ValueError(
                    f"shares must not decrease (pacing only opens samples), but point {i} has "
                    f"share {points[i][1]} after {points[i - 1][1]}"
                )
        if points[-1][1] != 1:
            raise ValueError(
                f"the last share must be 1 so that every sample opens, got {points[-1][1]}; "
                "add a final point such as (1.0, 1.0)"
            )
        return points

    @model_validator(mode="after")
    def _check_unit(self) -> PointsParams:
        if self.unit == "progress" and self.points[-1][0] > 1:
            raise ValueError(
                f"points: with unit 'progress' x must be in [0, 1], got x={self.points[-1][0]}; "
                "use unit: step for step counts"
            )
        return self


class Points(PacingFunction):
    """User-defined schedule: piecewise-linear through (progress-or-step, share) points.

    Before the first point the share is the first point's; after the last it is 1. With
    ``unit: step``, points past ``total_steps`` are never reached: everything is open at
    ``total_steps`` regardless. Two points with the same x make a jump (the later one wins at x).
    """

    Params = PointsParams

    def fraction(self, step: int, total_steps: int) -> float:
        if total_steps <= 0 or step >= total_steps:
            return 1.0
        points = self.params.points
        x = _t(step, total_steps) if self.params.unit == "progress" else float(max(step, 0))
        xs = [px for px, _ in points]
        j = bisect.bisect_right(xs, x)
        if j == 0:
            return points[0][1]
        if j == len(points):
            return 1.0
        (x0, y0), (x1, y1) = points[j - 1], points[j]
        return min(y1, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@hookimpl
def kd_register_pacings(register):
    register("none", NoPacing)
    register("linear", Linear)
    register("root", Root)
    register("exponential", Exponential)
    register("step", Step)
    register("geometric", Geometric)
    register("points", Points)
