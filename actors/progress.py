"""A counter that load generators add to and the driver polls, for the progress display."""

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

    def add(self, done: int, failed: int, cell_id: str | None = None) -> None:
        """A batch of finished requests (load generators report every ~100 ms, not per request)."""
        self.done += done
        self.failed += failed
        if cell_id is not None:
            self.by_cell[cell_id] = self.by_cell.get(cell_id, 0) + done

    def snapshot(self) -> tuple[int, int, dict[str, int]]:
        """Done, failed and done per cell, in one call: the display polls every 0.5 s."""
        return self.done, self.failed, dict(self.by_cell)


@dataclass(frozen=True)
class _CellAdd:
    counter: Any
    cell_id: str

    def remote(self, done: int, failed: int) -> Any:
        return self.counter.add.remote(done, failed, self.cell_id)


@dataclass(frozen=True)
class CellCounter:
    """One cell's handle on the run's single counter actor (one actor, not one process per cell):
    a load generator adds to it as it would to the counter (`add.remote(done, failed)`), and the
    count is also kept under the cell's id, so the display can say how far each cell is."""

    counter: Any
    cell_id: str

    @property
    def add(self) -> _CellAdd:
        return _CellAdd(self.counter, self.cell_id)
