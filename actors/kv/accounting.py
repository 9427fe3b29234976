"""Per-transfer accounting: the typed transfers.parquet row, and the same numbers as Ray metrics.

Every duration is measured inside one process: extract and put on the sending side, the rest on
the receiving side; the sender's numbers travel to the receiver with the layer groups' metadata,
so one record holds the whole transfer without ever subtracting two processes' clocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Sender-side stages, then receiver-side stages (docs/metrics.md defines each).
SEND_STAGES = ("extract_s", "put_s")
RECEIVE_STAGES = ("wait_ref_s", "fetch_s", "get_s", "inject_s")


@dataclass
class SendStats:
    """What one `publish` did, summed over its layer groups (sender's clock)."""

    key: str
    tokens: int
    groups: int
    bytes: int
    extract_s: float
    put_s: float
    send_s: float  # wall time of the whole publish
    src_node: str
    taken: bool = True  # False: the receiver had given up on the key, the directory refused the bytes


@dataclass
class TransferRecord:
    """One request's KV transfer: a transfers.parquet row (docs/metrics.md).

    `status`: "ok", "failed", "cancelled" (the request ended while its KV was on the way) or "none"
    (a prompt shorter than one block + 1: nothing to move, so not a transfer at all).
    `bytes` is what went through the object store; `analytic_bytes` = tokens × KV bytes per token,
    so bytes − analytic_bytes is block padding or layout overhead. Stage times of stages that never
    ran (a transfer that failed early) are None. `total_s` is the receiver's wall time from asking
    for the first layer group to the last one injected; `stall_s` is the part of it the receiver
    sat waiting for KV it did not have yet (wait_ref_s + fetch_s). `send_s` is the sender's wall time
    from the start of its publish to its last put: send_s + total_s is the transfer path's time
    when the receiver asks after the sender is done (extract overlaps put on a GPU sender, so
    extract_s counts only what the put did not hide).

    Asynchronous loads (vLLM connector) add: `queued_s`, from the engine step that started the
    load to a worker thread taking it up; `kv_wait_s`, from that step to the KV injected, i.e. how
    long the request could not run for want of its KV; `ready_to_injected_s`, from the sender's KV
    being complete to the receiver's KV injected, from CLOCK_MONOTONIC stamps of two processes on
    one host (host-wide on Linux; None across hosts, where such a difference would mean nothing).
    """

    run_id: str
    cell_id: str
    request_id: str
    key: str
    tokens: int | None = None
    groups: int = 0
    bytes: int = 0
    analytic_bytes: int | None = None
    extract_s: float | None = None
    put_s: float | None = None
    wait_ref_s: float | None = None
    fetch_s: float | None = None
    get_s: float | None = None
    inject_s: float | None = None
    total_s: float | None = None
    stall_s: float | None = None
    send_s: float | None = None
    src_node: str | None = None
    dst_node: str | None = None
    ok: bool = False
    error: str | None = None
    status: str = "failed"
    queued_s: float | None = None
    kv_wait_s: float | None = None
    ready_to_injected_s: float | None = None
    injected_mono: float | None = None  # receiver's CLOCK_MONOTONIC when the KV was injected (host-wide)
    direct_groups: int = 0  # groups copied to the GPU straight from CUDA-registered object-store memory

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- Ray metrics -----------------------------------------------------------------------------
# Built lazily, once per process: ray.util.metrics objects must be created where they are recorded.
_BYTES_BOUNDARIES = [float(2**k) for k in range(10, 36, 2)]  # 1 KiB … 32 GiB
_SECONDS_BOUNDARIES = [1e-5 * 10 ** (k / 2) for k in range(15)]  # 10 µs … 100 s
_metrics: dict[str, Any] | None = None


def _get_metrics() -> dict[str, Any]:
    global _metrics
    if _metrics is None:
        from ray.util.metrics import Counter, Histogram

        _metrics = {
            "bytes": Counter(
                "pdbench_kv_bytes",
                description="KV bytes moved through the object store (prefill: put, decode: fetched)",
                tag_keys=("run", "cell", "role"),
            ),
            "transfers": Counter(
                "pdbench_kv_transfers",
                description="KV transfers finished on the decode side, by outcome",
                tag_keys=("run", "cell", "role", "ok"),
            ),
            "size": Histogram(
                "pdbench_kv_transfer_size_bytes",
                description="bytes of one request's KV transfer",
                boundaries=_BYTES_BOUNDARIES,
                tag_keys=("run", "cell", "role"),
            ),
            "stage": Histogram(
                "pdbench_kv_stage_seconds",
                description="duration of one KV transfer stage (extract, put, wait_ref, fetch, get, inject, total, stall)",
                boundaries=_SECONDS_BOUNDARIES,
                tag_keys=("run", "cell", "role", "stage"),
            ),
        }
    return _metrics


def observe_send(stats: SendStats, run_id: str, cell_id: str) -> None:
    m = _get_metrics()
    tags = {"run": run_id, "cell": cell_id, "role": "prefill"}
    m["bytes"].inc(float(stats.bytes), tags=tags)
    for stage in SEND_STAGES:
        m["stage"].observe(getattr(stats, stage), tags={**tags, "stage": stage[:-2]})


def observe_receive(rec: TransferRecord) -> None:
    m = _get_metrics()
    tags = {"run": rec.run_id, "cell": rec.cell_id, "role": "decode"}
    m["transfers"].inc(1.0, tags={**tags, "ok": str(rec.ok).lower()})
    if rec.bytes:
        m["bytes"].inc(float(rec.bytes), tags=tags)
    if rec.ok:
        m["size"].observe(float(rec.bytes), tags=tags)
    for stage in (*RECEIVE_STAGES, "total_s", "stall_s"):
        v = getattr(rec, stage)
        if v is not None:
            m["stage"].observe(v, tags={**tags, "stage": stage[:-2]})
