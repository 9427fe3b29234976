"""KV transfer accounting: transfers.parquet rows → per-cell totals, stage times, throughputs, stall.

docs/metrics.md defines every number here. Stage times come from the process where the stage ran
(extract and put on the prefill side, the rest on the decode side); the stall ratio divides the
decode side's wait for KV by the request's E2E latency from requests.parquet (a ratio of two
durations, never a difference of two clocks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from analysis.metrics import distribution
from analysis.schemas import read_transfers

STAGES = ("extract_s", "put_s", "wait_ref_s", "fetch_s", "get_s", "inject_s")
# Stages that move bytes have a throughput; waiting for a reference moves none, and a GPU sender's
# extract_s counts only the part of its copy that the put did not hide (no bytes / time there).
MOVING_STAGES = ("put_s", "fetch_s", "get_s", "inject_s", "total_s")
# Asynchronous loads (vLLM connector): the step that started the load → a worker took it up /
# → KV injected; and the sender's KV complete → the receiver's KV injected (same host only).
ASYNC_TIMES = ("queued_s", "kv_wait_s", "ready_to_injected_s")


def transfers_frame(rows: Iterable[dict[str, Any]], warmup: Mapping[str, bool]) -> pd.DataFrame:
    """Transfer records (TransferRecord rows) and their requests' warm-up flags → the frame that
    transfers.parquet holds, typed as its schema says (analysis/schemas.py)."""
    df = pd.DataFrame(list(rows))
    df["warmup"] = [bool(warmup.get(r, False)) for r in df.get("request_id", [])]
    return read_transfers(df)


def moving_transfers(transfers: pd.DataFrame) -> pd.DataFrame:
    """Records of requests that had KV to move (a prompt shorter than one block + 1 has none: its
    record says so with status "none", and it is no transfer, neither ok nor failed)."""
    return transfers[transfers["status"] != "none"]


def measured_transfers(transfers: pd.DataFrame) -> pd.DataFrame:
    """Transfers of measured requests (warm-up ones stay in the file, out of every metric)."""
    return transfers[~transfers["warmup"].fillna(False).astype(bool)]


def with_stall_ratio(transfers: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """Add the request's `e2e_s` and `stall_ratio` = stall_s / e2e_s (null where either is missing)."""
    if requests.empty or "e2e_s" not in requests:
        out = transfers.copy()
        out["e2e_s"] = float("nan")
    else:
        e2e = requests[["cell_id", "request_id", "e2e_s"]].drop_duplicates(["cell_id", "request_id"])
        out = transfers.drop(columns=["e2e_s"], errors="ignore").merge(e2e, on=["cell_id", "request_id"], how="left")
    out["stall_ratio"] = out["stall_s"] / out["e2e_s"]
    return out


def bytes_vs_analytic(df: pd.DataFrame, block_tokens: int = 1) -> dict[str, int]:
    """Count transfers whose bytes equal the analytic KV size, exceed it by less than one block of
    padding (`block_tokens` tokens' worth), or fall outside that (too few bytes, or more overhead)."""
    ok = df[df["ok"] & df["analytic_bytes"].notna() & df["tokens"].gt(0)]
    per_token = ok["analytic_bytes"] / ok["tokens"]
    extra = ok["bytes"] - ok["analytic_bytes"]
    exact = extra.eq(0)
    padded = extra.gt(0) & extra.lt(per_token * block_tokens)
    return {"exact": int(exact.sum()), "within_padding": int(padded.sum()), "outside": int((~exact & ~padded).sum())}


def transfer_metrics(df: pd.DataFrame, block_tokens: int = 1) -> dict[str, Any]:
    """Totals and distributions for one cell's measured transfers (with_stall_ratio applied).

    Counts and failure reasons cover every transfer; times, throughputs and bytes cover the ones
    that succeeded (a failed transfer's partial stages would mix timeouts into the stage times).
    """
    df = moving_transfers(df)
    ok = df[df["ok"]]
    analytic = int(ok["analytic_bytes"].sum()) if ok["analytic_bytes"].notna().any() else None
    # None: the backend moves the KV where pdbench cannot count it (vLLM's NIXL): analytic bytes only.
    moved = int(ok["bytes"].sum()) if ok.empty or ok["bytes"].notna().any() else None
    out: dict[str, Any] = {
        "transfers": int(len(df)),
        "ok": int(len(ok)),
        "failed": int(len(df) - len(ok)),
        "failure_reasons": dict(Counter(str(e) for e in df.loc[~df["ok"], "error"])),
        "bytes_total": moved,
        "analytic_bytes_total": analytic,
        "overhead_ratio": (moved / analytic - 1.0) if analytic and moved is not None else None,
        "bytes_vs_analytic": bytes_vs_analytic(df, block_tokens),
        "bytes": distribution(ok["bytes"].astype("float64")),
        "stage_totals_s": {s: float(ok[s].sum()) for s in (*STAGES, "total_s", "stall_s")},
        "stages_s": {s: distribution(ok[s]) for s in (*STAGES, "total_s", "stall_s", *ASYNC_TIMES) if s in ok},
        "throughput_bytes_per_s": {s: distribution((ok["bytes"].astype("float64") / ok[s]).where(ok[s] > 0)) for s in MOVING_STAGES},
    }
    if "stall_ratio" in df:
        out["stall_ratio"] = distribution(ok["stall_ratio"])
    return out
