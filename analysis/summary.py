"""summary.json: per-cell metrics under docs/metrics.md's names, plus the track's verdicts."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.metrics import SLO, CellRows, cell_metrics, workload_of
from analysis.records import measured
from analysis.schemas import SCHEMA_VERSION
from analysis.tracks import get_analysis
from analysis.transfers import measured_transfers, transfer_metrics, with_stall_ratio


def build_summary(
    track: str,
    run_id: str,
    evidence: str,
    requests: pd.DataFrame,
    cells: dict[str, Any],
    slo: dict[str, Any],
    params: dict[str, Any],
    transfers: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Per-cell metrics (and, for cells that moved KV, `transfers`: totals and percentiles)."""
    s = SLO.model_validate(slo)
    out_cells: dict[str, Any] = {}
    meas = measured(requests) if not requests.empty else requests
    moved = None
    if transfers is not None and not transfers.empty:
        moved = with_stall_ratio(measured_transfers(transfers), meas)
    by_cell = CellRows.by_cell(meas)  # columns taken as arrays once, not one frame per cell
    for cid, meta in sorted(cells.items()):
        rows = by_cell.get(cid)
        out_cells[cid] = {
            "status": meta.get("status"),
            "error": meta.get("error"),
            "labels": meta.get("labels", {}),
            "serving_mode": meta.get("serving_mode"),
            "host_load": meta.get("host_load"),
            "metrics": cell_metrics(rows, s, *workload_of(meta)) if rows is not None else None,
        }
        if meta.get("kv_connector"):
            out_cells[cid]["kv_connector"] = meta["kv_connector"]
        cell_moved = moved[moved["cell_id"] == cid] if moved is not None else None
        if cell_moved is not None and not cell_moved.empty:
            out_cells[cid]["transfers"] = transfer_metrics(cell_moved)
    # Tracks judge finished cells with the metrics above (computed once, under the run's SLO).
    ok_cells = {c: {**m, "metrics": out_cells[c]["metrics"]} for c, m in cells.items() if m.get("status") == "ok"}
    analysis = get_analysis(track)
    verdicts = analysis.verdicts_with_transfers(requests, transfers, ok_cells, params) if ok_cells and not requests.empty else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "track": track,
        "evidence": evidence,
        "cells": out_cells,
        "verdicts": verdicts,
    }
