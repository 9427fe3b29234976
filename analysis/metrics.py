"""Metric formulas. docs/metrics.md states the same definitions; keep the two in step.

All latencies are seconds. `df` holds one cell's measured (non-warm-up) requests, failed ones
included: a failed request counts against SLO attainment instead of vanishing from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from analysis.records import HARNESS_COLUMNS, SERVER_COLUMNS
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
# Closed loop: sends closer than this (and than this share of the cell's mean gap between sends)
# form one burst; a burst of this many users or more is lockstep.
LOCKSTEP_GAP_S = 0.02
LOCKSTEP_GAP_SHARE = 0.25
LOCKSTEP_MIN_USERS = 4


class SLO(BaseModel):
    """Service-level objectives; a None bound is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttft_s: float | None = Field(default=1.0, gt=0)
    tpot_s: float | None = Field(default=0.1, gt=0)
    e2e_s: float | None = Field(default=None, gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1, description="share required for max-rate goodput")


_QUANTILES = np.true_divide(PERCENTILES, 100)


def percentiles(x: np.ndarray) -> np.ndarray:
    """`np.percentile(x, PERCENTILES)` (method "linear") of a non-empty array without NaN, numpy's own
    arithmetic step by step, so the values are the same to the bit: np.percentile's checks and
    dispatch cost ~60 µs a call, most of a cell's metrics (18 distributions a cell)."""
    s = np.sort(x)
    virtual = (s.size - 1) * _QUANTILES
    top = virtual >= s.size - 1  # numpy takes the last value there
    below = np.where(top, -1, np.floor(virtual)).astype(np.intp)
    above = np.where(top, -1, below + 1).astype(np.intp)
    gamma = virtual - below
    a, b = s[below], s[above]
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


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
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, percentiles(x), strict=True)},
        "count": int(x.size),
    }


# Columns the metrics read as float64 (NaN where missing): a cell's rows are taken as these arrays
# once (CellRows), since pandas' per-column filters cost ~5 ms a cell for a handful of rows (seconds at
# the end of a 1,000-cell sweep, on the driver).
NUMBER_COLUMNS = (
    "t_scheduled",
    "t_sent",
    "t_last_token",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "queue_delay_s",
    "input_tokens",
    "output_tokens",
    "harness_hop_s",
    "client_send_s",
    *HARNESS_COLUMNS,
    *SERVER_COLUMNS,
)


def _floats(s: pd.Series) -> np.ndarray:
    try:
        return np.asarray(s, dtype="float64")
    except (TypeError, ValueError):  # pandas' missing markers (pd.NA) and the like
        return np.asarray(pd.Series(s, dtype="float64"))


@dataclass(frozen=True)
class CellRows:
    """One cell's requests as arrays, the columns the metrics read (those the frame has): `ok`
    (bool), `itl_s` (a list of gaps per request) and NUMBER_COLUMNS."""

    n: int
    cols: dict[str, np.ndarray]

    def __contains__(self, col: str) -> bool:
        return col in self.cols

    def __getitem__(self, col: str) -> np.ndarray:
        return self.cols[col]

    def take(self, which: np.ndarray) -> CellRows:
        """The rows a boolean mask or an index array picks, in that order."""
        n = int(np.count_nonzero(which)) if which.dtype == bool else len(which)
        return CellRows(n, {k: v[which] for k, v in self.cols.items()})

    @staticmethod
    def of(df: pd.DataFrame) -> CellRows:
        cols = {c: _floats(df[c]) for c in NUMBER_COLUMNS if c in df}
        if "ok" in df:
            cols["ok"] = np.asarray(df["ok"]).astype(bool)
        if "itl_s" in df:
            cols["itl_s"] = np.asarray(df["itl_s"], dtype=object)
        return CellRows(len(df), cols)

    @staticmethod
    def by_cell(df: pd.DataFrame) -> dict[str, CellRows]:
        """Each cell's rows (by `cell_id`, rows in frame order), the columns converted once for all cells."""
        if df.empty:
            return {}
        codes, cells = pd.factorize(df["cell_id"])
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(cells) + 1))  # rows of code -1 (a null id) come first: left out
        whole = CellRows.of(df).take(order)
        return {
            cell: CellRows(int(b - a), {k: v[a:b] for k, v in whole.cols.items()})
            for cell, a, b in zip(cells, bounds[:-1], bounds[1:], strict=True)
        }


Rows = CellRows | pd.DataFrame


def _rows(rows: Rows) -> CellRows:
    return rows if isinstance(rows, CellRows) else CellRows.of(rows)


def _least(x: np.ndarray) -> float:
    """min of the non-NaN values, NaN where there are none (pandas' min(); np.nanmin warns there)."""
    x = x[~np.isnan(x)]
    return float(x.min()) if x.size else float("nan")


def _most(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else float("nan")


def _span(x: np.ndarray) -> float:
    return _most(x) - _least(x)


def _median(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(np.median(x)) if x.size else None


def duration_s(rows: Rows) -> float:
    """Measured window: first send → last token seen (load-generator clock)."""
    r = _rows(rows)
    if not r["ok"].any():
        return 0.0
    return _most(r["t_last_token"][r["ok"]]) - _least(r["t_sent"])


def meets_slo(rows: Rows, slo: SLO) -> np.ndarray:
    """True where a request completed and is inside every SLO that is set.

    TPOT is undefined for one-token outputs; such a request passes the TPOT bound.
    """
    r = _rows(rows)
    ok = r["ok"].copy()
    if slo.ttft_s is not None:
        ok &= r["ttft_s"] <= slo.ttft_s
    if slo.tpot_s is not None:
        ok &= np.isnan(r["tpot_s"]) | (r["tpot_s"] <= slo.tpot_s)
    if slo.e2e_s is not None:
        ok &= r["e2e_s"] <= slo.e2e_s
    return ok


def _rate(times: np.ndarray) -> float | None:
    """Events per second over the span of `times` (n − 1 gaps over first → last)."""
    span = _span(times) if len(times) >= 2 else 0.0
    return (len(times) - 1) / span if span > 0 else None


def burst_sizes(sent: np.ndarray) -> np.ndarray:
    """For each send (in the order given), how many sends its burst holds: a burst is sends each
    closer to the one before (in time order) than LOCKSTEP_GAP_S and than LOCKSTEP_GAP_SHARE of the
    mean gap between sends. The second bound keeps a fast but spread-out stream (evenly spaced sends
    at 100/s, 10 ms apart) from chaining into one burst. 0 for a send that never left (NaN)."""
    out = np.zeros(sent.size, dtype=np.int64)
    left = np.flatnonzero(~np.isnan(sent))
    if left.size == 0:
        return out
    order = left[np.argsort(sent[left], kind="stable")]
    gaps = np.diff(sent[order])
    bound = min(LOCKSTEP_GAP_S, LOCKSTEP_GAP_SHARE * float(gaps.mean())) if gaps.size else LOCKSTEP_GAP_S
    burst = np.concatenate(([0], np.cumsum(gaps >= bound)))
    out[order] = np.bincount(burst)[burst]
    return out


def lockstep_share(sent: np.ndarray) -> float | None:
    """The share of a closed loop's sends that left in a burst of LOCKSTEP_MIN_USERS or more
    (`burst_sizes`). Users whose requests end together send together again, so a closed loop can
    settle into waves: the engine then prefills each wave in one step and a disaggregated pair
    moves its KV all at once, and TTFT is that regime's, not the server's alone. The same server
    and load can settle in or out of it (two clients, or two runs), so comparisons read this beside
    TTFT (docs/metrics.md). None with fewer sends than a burst needs."""
    sizes = burst_sizes(sent)[~np.isnan(sent)]
    if sizes.size < LOCKSTEP_MIN_USERS:
        return None
    return float((sizes >= LOCKSTEP_MIN_USERS).mean())


def schedule_metrics(rows: Rows, target_rate_rps: float | None) -> dict[str, Any]:
    """Was the arrival process the one asked for? `target_rate_rps` None means a closed loop, whose
    schedule is "when a user is free" and so always kept (`schedule_kept` null); a closed loop says
    instead how much of it moved in lockstep (`lockstep_share`; null for an open loop, whose bursts
    are the schedule's own)."""
    r = _rows(rows)
    lag = r["queue_delay_s"][~np.isnan(r["queue_delay_s"])]
    scheduled = _rate(r["t_scheduled"]) if target_rate_rps is not None else None
    achieved = _rate(r["t_sent"])
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
        "lockstep_share": lockstep_share(r["t_sent"]) if target_rate_rps is None else None,
    }
    if scheduled is not None and achieved is not None and lag.size:
        bound = max(LAG_P99_FLOOR_S, LAG_P99_SHARE_OF_GAP / scheduled)
        out["schedule_kept"] = bool(out["send_lag_s"]["p99"] <= bound and achieved >= ACHIEVED_SHARE * scheduled)
    return out


def steady_metrics(rows: Rows, steady: SteadyState) -> dict[str, Any]:
    """Latency over the steady-state window (by send time), and whether it was steady: TTFT p50 per
    arrival quartile of the window, first to last."""
    r = _rows(rows)
    sent = r["t_sent"]
    first, span = _least(sent), _span(sent)
    lo, hi = first + steady.ramp_up * span, first + (1 - steady.cool_down) * span
    inside = np.flatnonzero((sent >= lo) & (sent <= hi))
    win = r.take(inside[np.argsort(sent[inside], kind="quicksort")])  # by send time, as pandas' sort_values
    done = win.take(win["ok"])
    quartiles = [_median(done["ttft_s"][i]) for i in np.array_split(np.arange(done.n), 4)]
    steady_flag = None
    q1, q4 = quartiles[0], quartiles[3]
    if done.n >= 8 and q1 is not None and q4 is not None:
        steady_flag = bool(q4 <= UNSTEADY_FACTOR * q1 + UNSTEADY_MARGIN_S)
    return {
        "ramp_up": steady.ramp_up,
        "cool_down": steady.cool_down,
        "window_s": [lo - first, hi - first],
        "requests": win.n,
        "completed": done.n,
        "ttft_s": distribution(done["ttft_s"]),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "ttft_p50_by_quartile_s": quartiles,
        "steady": steady_flag,
    }


def _any(done: CellRows, col: str) -> bool:
    return col in done and bool((~np.isnan(done[col])).any())


def harness_metrics(done: CellRows) -> dict[str, Any] | None:
    """The harness's own share of each latency, per request: the client's TTFT, TPOT and E2E minus
    the engine's own for the same request (`harness_*_s`, analysis/records.py), and what is left
    (`*_net`: the engine's part). `hop_s` is the bare actor hop the load generator timed before
    the measured phase (streaming no-ops): a floor, since a real request's hop also carries the
    engine thread's hand-over and a stream that has been idle. `client_send_s` (HTTP targets) is
    the client's own time from being asked to the request's headers on the socket."""
    hop = _median(done["harness_hop_s"]) if "harness_hop_s" in done else None
    has_shares, has_client = _any(done, "harness_ttft_s"), _any(done, "client_send_s")
    if hop is None and not has_shares and not has_client:
        return None
    out: dict[str, Any] = {"hop_s": hop}
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


def cell_metrics(rows: Rows, slo: SLO, steady: SteadyState | None = None, target_rate_rps: float | None = None) -> dict[str, Any]:
    """Everything summary.json holds for one cell, under docs/metrics.md's names.

    `target_rate_rps` is the open-loop arrival rate the cell was configured with (None: closed loop)."""
    df = _rows(rows)
    done = df.take(df["ok"])
    dur = duration_s(df)
    good = meets_slo(df, slo)
    itl = [g for gaps in done["itl_s"] for g in gaps] if "itl_s" in done else []
    out_tokens, in_tokens = float(np.nansum(done["output_tokens"])), float(np.nansum(done["input_tokens"]))
    out: dict[str, Any] = {
        "requests": df.n,
        "completed": done.n,
        "failed": df.n - done.n,
        "duration_s": dur,
        "request_throughput_rps": done.n / dur if dur > 0 else None,
        "output_token_throughput_tps": out_tokens / dur if dur > 0 else None,
        "total_token_throughput_tps": (out_tokens + in_tokens) / dur if dur > 0 else None,
        "ttft_s": distribution(done["ttft_s"]),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "itl_s": distribution(itl),
        "queue_delay_s": distribution(df["queue_delay_s"]),
        "slo": slo.model_dump(),
        "slo_attainment": float(good.mean()) if df.n else None,
        "goodput_rps": float(good.sum()) / dur if dur > 0 else None,
    }
    out["schedule"] = schedule_metrics(df, target_rate_rps)
    out["steady_state"] = steady_metrics(df, steady or SteadyState())
    if (harness := harness_metrics(done)) is not None:
        out["harness"] = harness
    for col in SERVER_COLUMNS:
        if _any(done, col):
            out[col] = distribution(done[col])
    return out
