"""Raw load-generator records → the `requests.parquet` schema (docs/metrics.md).

Derived columns are computed here, once, from one process's clock at a time: client times come
from the load generator, server durations from the engine's own process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.schemas import REQUESTS

SERVER_COLUMNS = ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s")
HARNESS_COLUMNS = ("harness_ttft_s", "harness_tpot_s", "harness_e2e_s")
# Columns that are float64 whatever a record holds (None, an int, a server's string): NaN where not a number.
FLOAT_COLUMNS = frozenset(
    ("ttft_s", "tpot_s", "e2e_s", "t_first_token", "t_last_token", "harness_hop_s", "client_send_s", *HARNESS_COLUMNS, *SERVER_COLUMNS)
)


def derive(raw: dict[str, Any]) -> dict[str, Any]:
    """One request's row: TTFT, TPOT, E2E, ITL and send lag from its client timestamps.

    `t_chunks` holds the arrival of each message that carried tokens: ITL is one gap per message
    (vLLM bench's `itl`), never a 0 for tokens that came together; TPOT spreads the time after
    the first message over every token after the first.
    """
    t = list(raw.get("t_chunks") or [])
    n = len(raw.get("output_token_ids") or [])
    row = {k: v for k, v in raw.items() if k not in ("t_chunks", "chunk_tokens", "server", "server_token_s")}
    # The engine's own per-token times: seconds since it received the request (its clock only).
    row["server_token_s"] = list(raw.get("server_token_s") or [])
    row["output_tokens"] = n
    row["t_first_token"] = t[0] if t else None
    row["t_last_token"] = t[-1] if t else None
    row["ttft_s"] = t[0] - raw["t_sent"] if t else None
    row["tpot_s"] = (t[-1] - t[0]) / (n - 1) if n >= 2 else None
    row["e2e_s"] = t[-1] - raw["t_sent"] if t else None
    row["queue_delay_s"] = raw["t_sent"] - raw["t_scheduled"]
    row["itl_s"] = [float(g) for g in np.diff(t)] if len(t) >= 2 else []
    row.update(harness_shares(row, row["server_token_s"]))
    server = raw.get("server") or {}
    for col in SERVER_COLUMNS:
        row[col] = server.get(col)
    # Engine-specific extras (vLLM's own stats, ...) keep their names beside the standard ones,
    # but never replace a column pdbench measured itself (a server under test reports what it likes).
    # Each is a column of analysis/schemas.py's REQUESTS: the writer refuses one it does not list.
    row.update({k: v for k, v in server.items() if k not in row})
    return row


def harness_shares(row: dict[str, Any], st: list[float]) -> dict[str, float | None]:
    """What the harness (actor hops, streaming, the load generator) adds to TTFT, TPOT and E2E:
    the client's duration minus the engine's own for the same request (each a duration on one
    process's clock). None where the engine reports no token times (an external server)."""
    if not st or len(st) != row["output_tokens"] or row["ttft_s"] is None:
        return {"harness_ttft_s": None, "harness_tpot_s": None, "harness_e2e_s": None}
    n = len(st)
    return {
        "harness_ttft_s": row["ttft_s"] - st[0],
        "harness_tpot_s": row["tpot_s"] - (st[-1] - st[0]) / (n - 1) if n >= 2 else None,
        "harness_e2e_s": row["e2e_s"] - st[-1],
    }


def _rows(raws: Iterable[dict[str, Any]], identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Each record's row, `identity` stamped on it, the float columns numbers (NaN where not one)."""
    rows = [{**derive(r), **identity} for r in raws]
    for r in rows:
        for c in FLOAT_COLUMNS.intersection(r):
            r[c] = _number(r[c])
    return rows


def to_frame(raws: Iterable[dict[str, Any]], **identity: Any) -> pd.DataFrame:
    """Rows for one cell; `identity` (run_id, cell_id, serving_mode, engine, ...) is stamped on each."""
    rows = _rows(raws, identity)
    # Built column by column, the float columns converted on the way in: converting them in the
    # frame afterwards cost the driver several milliseconds per cell for a handful of rows.
    names = dict.fromkeys(k for r in rows for k in r)
    floats = {c: np.array([r.get(c, math.nan) for r in rows], dtype=float) for c in names if c in FLOAT_COLUMNS}
    return pd.DataFrame({c: floats[c] if c in floats else [r.get(c, np.nan) for r in rows] for c in names})


def to_table(raws: Iterable[dict[str, Any]], **identity: Any) -> pa.Table:
    """The rows of `to_frame`, typed by requests.parquet's schema where the records are made (the
    load generator, on the cell's node), so the driver only checks and writes them: typing a cell's
    frame column by column was a third of the driver's file writing per cell. Typed straight from
    the rows, without a frame: 1.8 -> 0.3 ms of CPU for a small cell's three records."""
    return REQUESTS.table(_rows(raws, identity))


def table_bytes(table: pa.Table) -> bytes:
    """The table as one Arrow IPC stream (schema and its metadata included): how a cell's rows
    cross a process boundary. Ray's own reducer for a table took 1.4 ms to write and ~0.9 ms to read
    a 55-column cell of three rows, on each cell's critical path; the stream takes ~0.03 ms each way."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _number(v: Any) -> float:
    """`pd.to_numeric(v, errors="coerce")` of one value: a number, or a string that reads as one, else NaN."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def measured(df: pd.DataFrame) -> pd.DataFrame:
    """Warm-up rows stay in the file but never in a metric."""
    return df[~df["warmup"].astype(bool)]
