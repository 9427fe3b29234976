"""A pooled aggregated cell's load, finished where it ran: the load generator frames the records,
computes the measured rows' metrics and reads its engines' memory before it answers, in the one
call the driver makes per cell (`LoadGenerator.run_cell`).

The driver is one process for every node of the cluster: framing a cell's records, its metrics
(summary.json's, the same function on the same rows) and one call per engine for its memory cost
it tens of milliseconds per cell, which a sweep of many short cells pays one after another; on the
cell's own node they run beside the next cell's load, each node for its own cells.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis.errortext import one_line
from analysis.metrics import SLO, cell_metrics
from analysis.records import measured, to_frame
from workloads.arrivals import SteadyState


@dataclass(frozen=True)
class Framing:
    """What the rows and their metrics need of the cell: the columns every row is stamped with (run,
    cell, serving mode, engine), the run's SLO, the cell's steady-state window and its target rate
    (None: closed loop), as analysis.metrics.workload_of reads them from cell.json."""

    identity: dict[str, Any]
    slo: SLO
    steady: SteadyState
    target_rate_rps: float | None


@dataclass
class CellLoad:
    requests: pd.DataFrame  # every record, warm-up included, as analysis.records.to_frame makes them
    metrics: dict[str, Any] | None  # cell_metrics of the measured rows; None when no row was measured
    memory: list[dict[str, Any] | None]  # per engine, after the run; None where it could not be read
    faults: list[str]  # "engine<i> memory: <why>" for each engine whose memory could not be read
    load_s: float  # the load itself (warm-up, hop probe, measured requests): finishing it here is not part of it


async def finish(raws: list[dict[str, Any]], load_s: float, engines: list[Any], framing: Framing) -> CellLoad:
    got = await asyncio.gather(*(e.memory.remote() for e in engines), return_exceptions=True)
    faults = [f"engine{i} memory: {one_line(m)}" for i, m in enumerate(got) if isinstance(m, BaseException)]
    memory = [None if isinstance(m, BaseException) else m for m in got]
    df = to_frame(raws, **framing.identity)
    rows = measured(df) if not df.empty else df
    metrics = cell_metrics(rows, framing.slo, framing.steady, framing.target_rate_rps) if not rows.empty else None
    return CellLoad(df, metrics, memory, faults, load_s)
