"""The run-level files, rebuilt from the cell files so they never hold a cell twice:
requests.parquet, transfers.parquet, memory.json, errors.log, summary.json; and telemetry.parquet,
which a resumed run appends to.

The rows of the cells this run wrote come from the tables it kept as it wrote them (CellTables);
only cells of an earlier attempt (a resume) are read back from their files (cells/<id>/requests.arrow):
reading 1,000 small parquet files back cost the driver ~8 ms per cell at the end of a sweep.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from analysis.packet import (
    CELL_REQUESTS,
    CELL_TRANSFERS,
    PacketError,
    read_parquet,
    read_rows,
    write_json,
    write_log,
    write_parquet,
    write_rows,
)
from analysis.schemas import REQUESTS, TRANSFERS, RowSchema, read_requests, read_transfers
from analysis.summary import build_summary
from cluster.cell_record import MEASURED, CellTables
from cluster.config import ExperimentConfig


def _rows(parts: list[pa.Table | Path], schema: RowSchema, read: Callable[[pa.Table], pd.DataFrame]) -> pd.DataFrame | None:
    """The cells' rows in order as one frame: runs of kept tables concatenated as Arrow (one
    conversion to pandas each), files read one by one (any version, as `read` maps it)."""
    frames: list[pd.DataFrame] = []
    for is_table, group in itertools.groupby(parts, key=lambda p: isinstance(p, pa.Table)):
        if not is_table:
            frames += [read_rows(p, read) for p in group if isinstance(p, Path)]
            continue
        tables = [t for t in group if isinstance(t, pa.Table)]
        try:  # cells whose engine extras (vllm_*) differ in kind cannot share an Arrow column: frame them apart
            frames.append(schema.frame(pa.concat_tables(tables, promote_options="default")))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frames += [schema.frame(t) for t in tables]
    return pd.concat(frames, ignore_index=True) if frames else None


def _records(run_dir: Path, kept: list[str], written: dict[str, CellTables]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    def requests(c: str) -> pa.Table | Path:
        return written[c].requests if c in written else run_dir / "cells" / c / CELL_REQUESTS

    def transfers(c: str) -> pa.Table | Path | None:
        if c in written:
            return written[c].transfers
        p = run_dir / "cells" / c / CELL_TRANSFERS
        return p if p.is_file() else None

    df = _rows([requests(c) for c in kept], REQUESTS, read_requests)
    df = df if df is not None else pd.DataFrame()
    write_rows(run_dir / "requests.parquet", df, REQUESTS)
    tdf = _rows([t for c in kept if (t := transfers(c)) is not None], TRANSFERS, read_transfers)
    if tdf is not None:
        write_rows(run_dir / "transfers.parquet", tdf, TRANSFERS)
    return df, tdf


def assemble(
    run_dir: Path, cfg: ExperimentConfig, run_id: str, metas: list[dict[str, Any]], written: dict[str, CellTables] | None = None
) -> str:
    """Write the run-level files of the finished cells; the run's status. `written`: the tables of
    the cells this run wrote, by cell id; other cells are read from their files."""
    cells = {m["cell_id"]: m for m in metas}
    kept = [c for c, m in cells.items() if m["status"] in MEASURED]
    df, tdf = _records(run_dir, kept, written or {})
    memory = {c: m["memory"] for c, m in cells.items() if m.get("memory")}
    if memory:
        write_json(run_dir / "memory.json", memory)
    logs = [f"== cell {c}\n{(run_dir / m['log']).read_text()}" for c, m in cells.items() if m.get("log")]
    if logs:
        write_log(run_dir / "errors.log", "\n".join(logs))
    evidence = "simulated" if cfg.simulated else "real"
    summary = build_summary(cfg.track, run_id, evidence, df, cells, cfg.slo.model_dump(), cfg.params, tdf)
    write_json(run_dir / "summary.json", summary)
    # A refused cell (its backend cannot run on this machine) is an answer, not a failure; a run
    # of refused cells only measured nothing.
    n_ok = sum(m["status"] == "ok" for m in metas)
    n_refused = sum(m["status"] == "refused" for m in metas)
    if n_ok + n_refused == len(metas) and (n_ok or not metas):
        return "complete"
    return "partial" if kept else "failed"


def save_telemetry(run_dir: Path, per_node: list[Any]) -> None:
    """telemetry.parquet: GPU/CPU samples of every node over the run (a resumed run appends)."""
    rows = [r for got in per_node if isinstance(got, list) for r in got]
    path = run_dir / "telemetry.parquet"
    df = pd.DataFrame(rows)
    if path.is_file():
        with contextlib.suppress(PacketError):  # an earlier attempt's samples were damaged: this attempt's stand alone
            df = pd.concat([read_parquet(path), df], ignore_index=True)
    if not df.empty:
        write_parquet(path, df)
