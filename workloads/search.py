"""Bounded search for max-rate goodput: the highest request rate whose SLO attainment meets the
target (DistServe's goodput; docs/metrics.md).

The search is a bisection over rates inside [low, high]: probe both ends, then the midpoint of
the bracket (highest passing rate, lowest failing rate above it) until the bracket is no wider
than `resolution`. It is a pure function of the probes measured so far, so a track can propose
the next cells from finished results, a resumed run proposes the same ones, and the report
computes the same bracket from the artifacts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


def round_rate(rate: float) -> float:
    """Four significant digits: rates appear in cell ids and must not differ by float noise."""
    return float(f"{rate:.4g}")


@dataclass(frozen=True)
class Bracket:
    """What the probes say about the highest rate that meets the target.

    `passing`: the highest rate that met it below the lowest failing rate; `failing`: the lowest
    rate that missed it. `status`: `bracketed` (answer in [passing, failing)), `below_range`
    (even the lowest probe missed), `above_range` (even the highest probe met it), `empty`.
    `non_monotone` lists passing rates above a failing one (noise, or a non-monotone system):
    they are ignored, conservatively, and the report says so.
    """

    passing: float | None
    failing: float | None
    status: Literal["bracketed", "below_range", "above_range", "empty"]
    non_monotone: tuple[float, ...] = ()

    @property
    def width(self) -> float | None:
        return None if self.passing is None or self.failing is None else self.failing - self.passing


def meets_target(attainment: float | None, target: float | None) -> bool:
    """The search's pass rule, for the search and the report alike: a probe passes when its SLO
    attainment reaches the target."""
    return attainment is not None and target is not None and attainment >= target


def bracket(points: Mapping[float, bool]) -> Bracket:
    """`points`: rate → whether attainment met the target at that rate."""
    if not points:
        return Bracket(None, None, "empty")
    failing = min((r for r, ok in points.items() if not ok), default=None)
    passing = max((r for r, ok in points.items() if ok and (failing is None or r < failing)), default=None)
    above = tuple(sorted(r for r, ok in points.items() if ok and failing is not None and r > failing))
    status: Literal["bracketed", "below_range", "above_range"]
    if passing is None:
        status = "below_range"
    elif failing is None:
        status = "above_range"
    else:
        status = "bracketed"
    return Bracket(passing, failing, status, above)


def next_rates(points: Mapping[float, bool], low: float, high: float, resolution: float) -> list[float]:
    """Rates to probe next (empty: the search is done).

    With nothing measured, both ends at once. Then: if everything measured missed, probe `low`
    (done once it missed too); if everything met the target, probe `high` (done once it met it
    too); otherwise bisect the bracket until it is no wider than `resolution`. Probes measured
    elsewhere (a rate sweep with the same arrival process) count as points too.
    """
    if not 0 < low < high:
        raise ValueError(f"rate search needs 0 < low < high, got low={low}, high={high}")
    low, high = round_rate(low), round_rate(high)
    b = bracket(points)
    if b.status == "empty":
        return [low, high]
    if b.status == "below_range":
        return [] if low in points or (b.failing is not None and b.failing <= low) else [low]
    if b.status == "above_range":
        return [] if high in points or (b.passing is not None and b.passing >= high) else [high]
    if b.passing is None or b.failing is None or b.failing - b.passing <= resolution:
        return []
    mid = round_rate((b.passing + b.failing) / 2)
    return [] if mid in points else [mid]
