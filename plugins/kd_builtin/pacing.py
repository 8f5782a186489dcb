"""Pacing functions: the share of the easy-to-hard ordering open at each step."""

from __future__ import annotations

from kdcore import PacingFunction, hookimpl


class NoPacing(PacingFunction):
    """Everything open from the first step: plain shuffled epochs."""

    def fraction(self, step: int, total_steps: int) -> float:
        return 1.0


@hookimpl
def kd_register_pacings(register):
    register("none", NoPacing)
