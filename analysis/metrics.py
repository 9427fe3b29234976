"""Metric formulas. docs/metrics.md states the same definitions; keep the two in step.

All latencies are seconds. `df` holds one cell's measured (non-warm-up) requests, failed ones
included: a failed request counts against SLO attainment instead of vanishing from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from workloads.arrivals import SteadyState

PERCENTILES = (50, 90, 95, 99)

# The schedule was kept when send lag p99 is within the larger of these and the send rate
# reached this share of the scheduled rate (docs/metrics.md, "schedule_kept").
LAG_P99_FLOOR_S = 0.001
LAG_P99_SHARE_OF_GAP = 0.1
ACHIEVED_SHARE = 0.95
# Steady when TTFT p50 of the window's last arrival quartile is within this factor plus margin of the first's.
UNSTEADY_FACTOR = 1.5
UNSTEADY_MARGIN_S = 0.005


class SLO(BaseModel):
    """Service-level objectives; a None bound is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttft_s: float | None = Field(default=1.0, gt=0)
    tpot_s: float | None = Field(default=0.1, gt=0)
    e2e_s: float | None = Field(default=None, gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1, description="share required for max-rate goodput")


def distribution(values: Any) -> dict[str, float | None]:
    """mean, std (population), p50/p90/p95/p99 (linear interpolation) of the non-null values."""
    try:  # a float column or a list of floats and None (the usual case): numpy alone, no Series per call
        x = np.asarray(values, dtype="float64")
        x = x[~np.isnan(x)]
    except (TypeError, ValueError):  # pandas' missing markers (pd.NA) and the like
        x = np.asarray(pd.Series(values, dtype="float64").dropna())
    if x.size == 0:
        return {"mean": None, "std": None, **{f"p{p}": None for p in PERCENTILES}, "count": 0}
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True)},
        "count": int(x.size),
    }


def duration_s(df: pd.DataFrame) -> float:
    """Measured window: first send → last token seen (load-generator clock)."""
    ok = df[df["ok"]]
    if ok.empty:
        return 0.0
    return float(ok["t_last_token"].max() - df["t_sent"].min())


def meets_slo(df: pd.DataFrame, slo: SLO) -> pd.Series:
    """True where a request completed and is inside every SLO that is set.

    TPOT is undefined for one-token outputs; such a request passes the TPOT bound.
    """
    ok = df["ok"].astype(bool).copy()
    if slo.ttft_s is not None:
        ok &= df["ttft_s"].le(slo.ttft_s)
    if slo.tpot_s is not None:
        ok &= df["tpot_s"].isna() | df["tpot_s"].le(slo.tpot_s)
    if slo.e2e_s is not None:
        ok &= df["e2e_s"].le(slo.e2e_s)
    return ok


def _rate(times: pd.Series) -> float | None:
    """Events per second over the span of `times` (n − 1 gaps over first → last)."""
    span = float(times.max() - times.min()) if len(times) >= 2 else 0.0
    return (len(times) - 1) / span if span > 0 else None


def schedule_metrics(df: pd.DataFrame, target_rate_rps: float | None) -> dict[str, Any]:
    """Was the arrival process the one asked for? `target_rate_rps` None means a closed loop, whose
    schedule is "when a user is free" and so always kept (`schedule_kept` null)."""
    lag = np.asarray(df["queue_delay_s"].dropna(), dtype="float64")
    scheduled = _rate(df["t_scheduled"]) if target_rate_rps is not None else None
    achieved = _rate(df["t_sent"])
    out: dict[str, Any] = {
        "target_rate_rps": target_rate_rps,
        "scheduled_rate_rps": scheduled,
        "achieved_rate_rps": achieved,
        "send_lag_s": {
            "p50": float(np.percentile(lag, 50)) if lag.size else None,
            "p99": float(np.percentile(lag, 99)) if lag.size else None,
            "max": float(lag.max()) if lag.size else None,
        },
        "schedule_kept": None,
    }
    if scheduled is not None and achieved is not None and lag.size:
        bound = max(LAG_P99_FLOOR_S, LAG_P99_SHARE_OF_GAP / scheduled)
        out["schedule_kept"] = bool(out["send_lag_s"]["p99"] <= bound and achieved >= ACHIEVED_SHARE * scheduled)
    return out


def steady_metrics(df: pd.DataFrame, steady: SteadyState) -> dict[str, Any]:
    """Latency over the steady-state window (by send time), and whether it was steady: TTFT p50 per
    arrival quartile of the window, first to last."""
    sent = df["t_sent"]
    first, span = float(sent.min()), float(sent.max() - sent.min())
    lo, hi = first + steady.ramp_up * span, first + (1 - steady.cool_down) * span
    win = df[(sent >= lo) & (sent <= hi)].sort_values("t_sent")
    done = win[win["ok"].astype(bool)]
    parts = [done["ttft_s"].iloc[i] for i in np.array_split(np.arange(len(done)), 4)]
    quartiles = [float(q.median()) if q.notna().any() else None for q in parts]
    steady_flag = None
    q1, q4 = quartiles[0], quartiles[3]
    if len(done) >= 8 and q1 is not None and q4 is not None:
        steady_flag = bool(q4 <= UNSTEADY_FACTOR * q1 + UNSTEADY_MARGIN_S)
    return {
        "ramp_up": steady.ramp_up,
        "cool_down": steady.cool_down,
        "window_s": [lo - first, hi - first],
        "requests": len(win),
        "completed": len(done),
        "ttft_s": distribution(done["ttft_s"]),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "ttft_p50_by_quartile_s": quartiles,
        "steady": steady_flag,
    }


def harness_metrics(done: pd.DataFrame) -> dict[str, Any] | None:
    """The harness's own share of each latency, per request: the client's TTFT, TPOT and E2E minus
    the engine's own for the same request (`harness_*_s`, analysis/records.py), and what is left
    (`*_net`: the engine's part). `hop_s` is the bare actor hop the load generator timed before
    the measured phase (streaming no-ops): a floor, since a real request's hop also carries the
    engine thread's hand-over and a stream that has been idle. `client_send_s` (HTTP targets) is
    the client's own time from being asked to the request's headers on the socket."""
    hop = done["harness_hop_s"].dropna() if "harness_hop_s" in done else pd.Series(dtype="float64")
    has_shares = "harness_ttft_s" in done and done["harness_ttft_s"].notna().any()
    has_client = "client_send_s" in done and done["client_send_s"].notna().any()
    if hop.empty and not has_shares and not has_client:
        return None
    out: dict[str, Any] = {"hop_s": float(hop.median()) if not hop.empty else None}
    if has_client:  # HTTP targets: the client's own time before the request left (not inside TTFT)
        out["client_send_s"] = distribution(done["client_send_s"])
    if has_shares:
        ttft_p50 = distribution(done["ttft_s"])["p50"]
        for m in ("ttft_s", "tpot_s", "e2e_s"):
            out[m] = distribution(done[f"harness_{m}"])
            out[f"{m}_net"] = distribution(done[m] - done[f"harness_{m}"])
        out["share_of_ttft_p50"] = out["ttft_s"]["p50"] / ttft_p50 if ttft_p50 else None
    return out


def workload_of(meta: dict[str, Any]) -> tuple[SteadyState, float | None]:
    """A cell's steady-state window and target arrival rate from its cell.json (a cell written
    before they were recorded gets the default window and counts as closed loop)."""
    arrival = meta.get("arrival") or {}
    return SteadyState.model_validate(meta.get("steady_state") or {}), arrival.get("rate")


def cell_metrics(df: pd.DataFrame, slo: SLO, steady: SteadyState | None = None, target_rate_rps: float | None = None) -> dict[str, Any]:
    """Everything summary.json holds for one cell, under docs/metrics.md's names.

    `target_rate_rps` is the open-loop arrival rate the cell was configured with (None: closed loop)."""
    done = df[df["ok"].astype(bool)]
    dur = duration_s(df)
    good = meets_slo(df, slo)
    itl = [g for gaps in done["itl_s"] for g in gaps] if "itl_s" in done else []
    out: dict[str, Any] = {
        "requests": int(len(df)),
        "completed": len(done),
        "failed": int(len(df) - len(done)),
        "duration_s": dur,
        "request_throughput_rps": len(done) / dur if dur > 0 else None,
        "output_token_throughput_tps": float(done["output_tokens"].sum()) / dur if dur > 0 else None,
        "total_token_throughput_tps": float(done["output_tokens"].sum() + done["input_tokens"].sum()) / dur if dur > 0 else None,
        "ttft_s": distribution(done["ttft_s"]),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "itl_s": distribution(itl),
        "queue_delay_s": distribution(df["queue_delay_s"]),
        "slo": slo.model_dump(),
        "slo_attainment": float(good.mean()) if len(df) else None,
        "goodput_rps": float(good.sum()) / dur if dur > 0 else None,
    }
    out["schedule"] = schedule_metrics(df, target_rate_rps)
    out["steady_state"] = steady_metrics(df, steady or SteadyState())
    if (harness := harness_metrics(done)) is not None:
        out["harness"] = harness
    for col in ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s"):
        if col in done and done[col].notna().any():
            out[col] = distribution(done[col])
    return out
