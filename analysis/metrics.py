"""Metric formulas. docs/metrics.md states the same definitions; keep the two in step.

All latencies are seconds. `df` holds one cell's measured (non-warm-up) requests, failed ones
included: a failed request counts against SLO attainment instead of vanishing from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

PERCENTILES = (50, 90, 95, 99)


class SLO(BaseModel):
    """Service-level objectives; a None bound is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttft_s: float | None = Field(default=1.0, gt=0)
    tpot_s: float | None = Field(default=0.1, gt=0)
    e2e_s: float | None = Field(default=None, gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1, description="share required for max-rate goodput")


def distribution(values: Any) -> dict[str, float | None]:
    """mean, std (population), p50/p90/p95/p99 (linear interpolation) of the non-null values."""
    x = np.asarray(pd.Series(values, dtype="float64").dropna())
    if x.size == 0:
        return {"mean": None, "std": None, **{f"p{p}": None for p in PERCENTILES}, "count": 0}
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES},
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


def cell_metrics(df: pd.DataFrame, slo: SLO) -> dict[str, Any]:
    """Everything summary.json holds for one cell, under docs/metrics.md's names."""
    done = df[df["ok"].astype(bool)]
    dur = duration_s(df)
    good = meets_slo(df, slo)
    itl = [g for gaps in done["itl_s"] for g in gaps] if "itl_s" in done else []
    out: dict[str, Any] = {
        "requests": int(len(df)),
        "completed": int(len(done)),
        "failed": int(len(df) - len(done)),
        "duration_s": dur,
        "request_throughput_rps": len(done) / dur if dur > 0 else None,
        "output_token_throughput_tps": float(done["output_tokens"].sum()) / dur if dur > 0 else None,
        "total_token_throughput_tps": float(done["output_tokens"].sum() + done["input_tokens"].sum()) / dur
        if dur > 0
        else None,
        "ttft_s": distribution(done["ttft_s"]),
        "tpot_s": distribution(done["tpot_s"]),
        "e2e_s": distribution(done["e2e_s"]),
        "itl_s": distribution(itl),
        "queue_delay_s": distribution(df["queue_delay_s"]),
        "slo": slo.model_dump(),
        "slo_attainment": float(good.mean()) if len(df) else None,
        "goodput_rps": float(good.sum()) / dur if dur > 0 else None,
    }
    for col in ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s"):
        if col in done and done[col].notna().any():
            out[col] = distribution(done[col])
    return out
