"""A counter that load generators tick and the driver polls, for the progress display."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.by_cell: dict[str, int] = {}

    def tick(self, ok: bool, cell_id: str | None = None) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if cell_id is not None:
            self.by_cell[cell_id] = self.by_cell.get(cell_id, 0) + 1

    def read(self) -> tuple[int, int]:
        return self.done, self.failed

    def read_cells(self) -> dict[str, int]:
        return dict(self.by_cell)


@dataclass(frozen=True)
class _CellTick:
    counter: Any
    cell_id: str

    def remote(self, ok: bool) -> Any:
        return self.counter.tick.remote(ok, self.cell_id)


@dataclass(frozen=True)
class CellCounter:
    """One cell's handle on the run's single counter actor (one actor, not one process per cell):
    a load generator ticks it as it would the counter (`tick.remote(ok)`), and the count is also
    kept under the cell's id, so the display can say how far each cell is."""

    counter: Any
    cell_id: str

    @property
    def tick(self) -> _CellTick:
        return _CellTick(self.counter, self.cell_id)
