"""The run-level files, rebuilt from the cell files so they never hold a cell twice:
requests.parquet, transfers.parquet, memory.json, errors.log, summary.json; and telemetry.parquet,
which a resumed run appends to."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.packet import PacketError, read_parquet, read_rows, write_json, write_log, write_parquet, write_rows
from analysis.schemas import REQUESTS, TRANSFERS, read_requests, read_transfers
from analysis.summary import build_summary
from cluster.cell_record import MEASURED
from cluster.config import ExperimentConfig


def _records(run_dir: Path, kept: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    frames = [read_rows(run_dir / "cells" / c / "requests.parquet", read_requests) for c in kept]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_rows(run_dir / "requests.parquet", df, REQUESTS)
    transfers = [read_rows(p, read_transfers) for c in kept if (p := run_dir / "cells" / c / "transfers.parquet").is_file()]
    tdf = pd.concat(transfers, ignore_index=True) if transfers else None
    if tdf is not None:
        write_rows(run_dir / "transfers.parquet", tdf, TRANSFERS)
    return df, tdf


def assemble(run_dir: Path, cfg: ExperimentConfig, run_id: str, metas: list[dict[str, Any]]) -> str:
    """Write the run-level files of the finished cells; the run's status."""
    cells = {m["cell_id"]: m for m in metas}
    kept = [c for c, m in cells.items() if m["status"] in MEASURED]
    df, tdf = _records(run_dir, kept)
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
