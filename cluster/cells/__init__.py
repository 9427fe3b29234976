"""How a cell of each serving mode is laid on placement groups and run. One module per mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cluster.cells import aggregated, disaggregated, external
from cluster.cells.base import CellContext, CellRefused, CellResult


@dataclass(frozen=True)
class ServingMode:
    run: Callable[[CellContext], Awaitable[CellResult]]
    bundles: Callable[[CellContext], list[dict[str, float]]]


MODES: dict[str, ServingMode] = {
    "aggregated": ServingMode(aggregated.run_aggregated, aggregated.bundles),
    "disaggregated": ServingMode(disaggregated.run_disaggregated, disaggregated.bundles),
    # Not a serving mode of ours: every cell of a run with a `target:` drives that server.
    "external": ServingMode(external.run_external, external.bundles),
}

__all__ = ["MODES", "CellContext", "CellRefused", "CellResult", "ServingMode"]
