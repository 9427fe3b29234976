"""One cell run and what it leaves on disk: cell.json, requests.arrow, transfers.arrow (Arrow IPC
files, analysis/packet.py) and errors.log under `cells/<cell_id>/`, each written atomically, in
order, by the run's file writer (cluster/file_writer.py) while the loop goes on with the next cells.

A cell that raises is a failed cell with its reason in one line (the traceback in errors.log),
never a failed run; a cell whose requests all failed keeps its records as evidence.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from analysis.errortext import MAX_LINE, first_line, one_line
from analysis.packet import CELL_REQUESTS, CELL_TRANSFERS, write_json, write_log, write_rows
from analysis.schemas import REQUESTS, TRANSFERS
from cluster.cells import MODES, CellContext, CellRefused, CellResult
from cluster.cells.engine_pool import engine_use_record
from cluster.file_writer import FileWriter
from cluster.hostload import HostLoadSampler
from cluster.planning import preflight
from cluster.resume import clear
from cluster.run_manifest import now
from workloads.text import get_codec
from workloads.tracks import CellPlan

# Cell statuses whose records count: `partial` is a fault after the requests ran (records kept).
MEASURED = ("ok", "partial")


def one_line_errors(rows: pa.Table | None) -> tuple[pa.Table | None, list[str]]:
    """Records whose `error` is more than one line (a remote traceback, colour codes) keep its
    first line; the whole texts come back for errors.log."""
    if rows is None or "error" not in rows.column_names:
        return rows, []
    texts = [e for e in pc.unique(rows["error"]).to_pylist() if isinstance(e, str)]  # in order of first appearance
    long = [e for e in texts if "\n" in e.strip() or "\x1b" in e or len(e) > MAX_LINE]
    if not long:
        return rows, []
    short = {e: first_line(e) for e in long}
    col = rows.schema.get_field_index("error")
    errors = pa.array([short.get(e, e) for e in rows["error"].to_pylist()], type=rows.schema.field(col).type)
    return rows.set_column(col, rows.schema.field(col), errors), long


def no_success(rows: pa.Table) -> str | None:
    """Why a cell measured nothing (no measured request succeeded), or None."""
    if rows.num_rows == 0:
        return "no request was measured"
    mine = ~rows["warmup"].to_numpy().astype(bool)  # analysis.records.measured's rows
    if not mine.any():
        return "no request was measured"
    if rows["ok"].to_numpy().astype(bool)[mine].any():
        return None
    errors = [e for e, m in zip(rows["error"].to_pylist(), mine, strict=True) if m and e is not None]
    first = f"; first error: {str(errors[0]).splitlines()[0][:200]}" if errors else ""
    n = int(mine.sum())
    return f"no request succeeded ({n} of {n} failed){first}"


def cell_node_ids(meta: dict[str, Any], rows: pa.Table) -> dict[str, list[str]]:
    """Ray node ids a cell ran on, by role (the manifest's per-cell `nodes`); a role no row names
    (the typed rows hold every role's column: prefill and decode are null in an aggregated cell) is left out."""
    out: dict[str, list[str]] = {}
    for col in rows.column_names if rows.num_rows else []:
        if col.endswith("_node_id") and rows[col].null_count < rows.num_rows:
            out[col.removesuffix("_node_id")] = sorted(str(v) for v in pc.unique(rows[col]).to_pylist() if v is not None)
    if not out.get("engine") and (meta.get("engine_info") or {}).get("node"):
        out["engine"] = [meta["engine_info"]["node"]["node_id"]]
    return out


def _with(rows: pa.Table, name: str, values: list[Any]) -> pa.Table:
    """`rows` with column `name` set to `values`, in the column's own type (a typed table holds every schema column)."""
    i = rows.schema.get_field_index(name)
    field = rows.schema.field(i)
    return rows.set_column(i, field, pa.array(values, type=field.type))


def annotate(plan: CellPlan, rows: pa.Table, meta: dict[str, Any]) -> pa.Table:
    """Disaggregated rows get the pair's node ids. Track-built prompts: each row gets its
    request's meta (answer, depth) and, where a tokenizer made the prompt, the decoded output,
    so scoring needs the files alone."""
    n = rows.num_rows
    if isinstance(meta.get("nodes"), dict) and n:
        for role, node in meta["nodes"].items():
            rows = _with(rows, f"{role}_node_id", [node] * n)
    if plan.requests is None or not n:
        return rows
    metas = {r.request_id: json.dumps(r.meta, sort_keys=True) if r.meta else None for r in plan.requests}
    rows = _with(rows, "meta", [metas.get(r) for r in rows["request_id"].to_pylist()])
    if plan.tokenizer:
        codec = get_codec(plan.tokenizer)
        rows = _with(rows, "output_text", [codec.decode(ids) for ids in rows["output_token_ids"].to_pylist()])
    return rows


def _started(ctx: CellContext, cell_hash: str) -> dict[str, Any]:
    plan = ctx.plan
    meta: dict[str, Any] = {
        "cell_id": plan.cell_id,
        "labels": plan.labels,
        "serving_mode": plan.serving_mode,
        "config_hash": cell_hash,
        "seed": ctx.seed,
        "started_at": now(),
        # What analysis needs of the workload: the offered rate and the steady-state window.
        "arrival": plan.workload.arrival.model_dump(mode="json"),
        "steady_state": plan.workload.steady_state.model_dump(mode="json"),
    }
    if plan.provenance:
        meta["provenance"] = plan.provenance
    return meta


@dataclass(frozen=True)
class _Records:
    """A finished cell's records, their long error texts taken out, for the file writer."""

    requests: pa.Table
    transfers: pa.Table | None
    engine_meta: dict[str, Any]
    long_errors: list[str]


def _settle(plan: CellPlan, result: CellResult, meta: dict[str, Any]) -> _Records:
    """The cell's status in `meta`, on the loop (the round needs it); what to write goes to the writer."""
    rows, long_errors = one_line_errors(result.requests)
    transfers, more = one_line_errors(result.transfers)
    if long_errors + more:  # remote tracebacks: the whole text in the log, one line in the tables
        meta["log"] = f"cells/{plan.cell_id}/errors.log"
    assert rows is not None  # a cell always returns its request records (maybe empty)
    meta.update(result.meta, node_ids=cell_node_ids(result.meta, result.requests))
    nothing = no_success(rows)
    if nothing:  # every request failed: the records stay as evidence, the cell did not measure
        meta.update(status="failed", error=nothing)
    elif result.fault:
        meta.update(status="partial", error=f"fault after the requests ran, records kept: {result.fault}")
    else:
        meta.update(status="ok", error=None)
    return _Records(rows, transfers, result.meta, long_errors + more)


@dataclass(frozen=True)
class CellTables:
    """A cell's rows as its files hold them (redacted, typed), kept by the run that wrote them: the
    run-level files concatenate these instead of reading every cell's files back (cluster/run_files.py)."""

    requests: pa.Table
    transfers: pa.Table | None


def _persist(
    plan: CellPlan, cell_dir: Path, meta: dict[str, Any], records: _Records | None, trace: str | None, tables: dict[str, CellTables]
) -> None:
    """On the file writer's thread: the cell's records, then its cell.json (resume trusts a cell by
    its cell.json, so that comes last). A records file that cannot be written fails the cell, its
    meta changed here before cell.json and before any manifest that lists it. The tables written
    go to `tables` under the cell's id."""
    try:
        if records is not None:
            if records.long_errors:
                write_log(cell_dir / "errors.log", "\n\n".join(records.long_errors))
            rows = write_rows(cell_dir / CELL_REQUESTS, annotate(plan, records.requests, records.engine_meta), REQUESTS)
            moved = None
            if records.transfers is not None:
                moved = write_rows(cell_dir / CELL_TRANSFERS, records.transfers, TRANSFERS)
            tables[plan.cell_id] = CellTables(rows, moved)
    except Exception as e:
        meta.update(status="failed", error=one_line(e), log=f"cells/{plan.cell_id}/errors.log")
        trace = traceback.format_exc()
    if trace is not None:
        write_log(cell_dir / "errors.log", trace)
    write_json(cell_dir / "cell.json", meta)


async def run_cell(
    ctx: CellContext, cell_dir: Path, cell_hash: str, host: HostLoadSampler, files: FileWriter, tables: dict[str, CellTables]
) -> dict[str, Any]:
    """Run one cell through its serving mode's runner; its cell.json contents, queued to `files`
    (the tables written kept in `tables`)."""
    clear(cell_dir)
    meta = _started(ctx, cell_hash)
    t0 = time.monotonic()
    window = host.mark()
    records, trace = None, None
    try:
        preflight(ctx.cfg, [ctx.plan])  # later rounds were not checked before the run began
        records = _settle(ctx.plan, await MODES[ctx.plan.serving_mode].run(ctx), meta)
    except CellRefused as e:  # a measured refusal: the reason is the whole answer
        meta.update(status="refused", error=str(e))
    except Exception as e:  # the cell fails with its reason (one line); the traceback goes to errors.log
        meta.update(status="failed", error=one_line(e), log=f"cells/{ctx.plan.cell_id}/errors.log")
        trace = traceback.format_exc()
    meta["ended_at"] = now()
    meta["wall_s"] = time.monotonic() - t0
    meta["engine_use"] = engine_use_record(ctx, len(MODES[ctx.plan.serving_mode].bundles(ctx)))
    meta["host_load"] = dataclasses.asdict(host.load(window))
    files.submit(_persist, ctx.plan, cell_dir, meta, records, trace, tables)
    return meta
