"""The numpy cell metrics (analysis/metrics.py) give summary.json the same numbers, to the bit, as
the pandas formulas they replaced, kept here as the reference: sample frames with failed requests,
missing values, ties in send time, harness and server columns, several cells in one frame."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import PERCENTILES, SLO, CellRows, cell_metrics, distribution, percentiles
from analysis.records import to_frame
from workloads.arrivals import SteadyState

# ---- the pandas reference: analysis/metrics.py's formulas before the numpy rewrite, unchanged ----


def ref_duration_s(df):
    ok = df[df["ok"]]
    if ok.empty:
        return 0.0
    return float(ok["t_last_token"].max() - df["t_sent"].min())


def ref_meets_slo(df, slo):
    ok = df["ok"].astype(bool).copy()
    if slo.ttft_s is not None:
        ok &= df["ttft_s"].le(slo.ttft_s)
    if slo.tpot_s is not None:
        ok &= df["tpot_s"].isna() | df["tpot_s"].le(slo.tpot_s)
    if slo.e2e_s is not None:
        ok &= df["e2e_s"].le(slo.e2e_s)
    return ok


def ref_rate(times):
    span = float(times.max() - times.min()) if len(times) >= 2 else 0.0
    return (len(times) - 1) / span if span > 0 else None


def ref_lockstep_share(df, target_rate_rps):
    sent = df["t_sent"].sort_values()
    if target_rate_rps is not None or len(sent) < 4:
        return None
    gaps = sent.diff()
    burst = (gaps >= min(0.02, 0.25 * gaps.mean())).cumsum()
    return float((burst.map(burst.value_counts()) >= 4).mean())


def ref_schedule_metrics(df, target_rate_rps):
    lag = np.asarray(df["queue_delay_s"].dropna(), dtype="float64")
    scheduled = ref_rate(df["t_scheduled"]) if target_rate_rps is not None else None
    achieved = ref_rate(df["t_sent"])
    out = {
        "target_rate_rps": target_rate_rps,
        "scheduled_rate_rps": scheduled,
        "achieved_rate_rps": achieved,
        "send_lag_s": {
            "p50": float(np.percentile(lag, 50)) if lag.size else None,
            "p99": float(np.percentile(lag, 99)) if lag.size else None,
            "max": float(lag.max()) if lag.size else None,
        },
        "schedule_kept": None,
        "lockstep_share": ref_lockstep_share(df, target_rate_rps),
    }
    if scheduled is not None and achieved is not None and lag.size:
        bound = max(0.001, 0.1 / scheduled)
        out["schedule_kept"] = bool(out["send_lag_s"]["p99"] <= bound and achieved >= 0.95 * scheduled)
    return out


def ref_distribution(values):
    x = np.asarray(pd.Series(values, dtype="float64").dropna())
    if x.size == 0:
        return {"mean": None, "std": None, **{f"p{p}": None for p in PERCENTILES}, "count": 0}
    pcts = np.percentile(x, PERCENTILES)
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pcts, strict=True)},
        "count": int(x.size),
    }


def ref_steady_metrics(df, steady):
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
        steady_flag = bool(q4 <= 1.5 * q1 + 0.005)
    return {
        "ramp_up": steady.ramp_up,
        "cool_down": steady.cool_down,
        "window_s": [lo - first, hi - first],
        "requests": len(win),
        "completed": len(done),
        "ttft_s": ref_distribution(done["ttft_s"]),
        "tpot_s": ref_distribution(done["tpot_s"]),
        "e2e_s": ref_distribution(done["e2e_s"]),
        "ttft_p50_by_quartile_s": quartiles,
        "steady": steady_flag,
    }


def ref_harness_metrics(done):
    hop = done["harness_hop_s"].dropna() if "harness_hop_s" in done else pd.Series(dtype="float64")
    has_shares = "harness_ttft_s" in done and done["harness_ttft_s"].notna().any()
    has_client = "client_send_s" in done and done["client_send_s"].notna().any()
    if hop.empty and not has_shares and not has_client:
        return None
    out = {"hop_s": float(hop.median()) if not hop.empty else None}
    if has_client:
        out["client_send_s"] = ref_distribution(done["client_send_s"])
    if has_shares:
        ttft_p50 = ref_distribution(done["ttft_s"])["p50"]
        for m in ("ttft_s", "tpot_s", "e2e_s"):
            out[m] = ref_distribution(done[f"harness_{m}"])
            out[f"{m}_net"] = ref_distribution(done[m] - done[f"harness_{m}"])
        out["share_of_ttft_p50"] = out["ttft_s"]["p50"] / ttft_p50 if ttft_p50 else None
    return out


def ref_cell_metrics(df, slo, steady=None, target_rate_rps=None):
    done = df[df["ok"].astype(bool)]
    dur = ref_duration_s(df)
    good = ref_meets_slo(df, slo)
    itl = [g for gaps in done["itl_s"] for g in gaps] if "itl_s" in done else []
    out = {
        "requests": int(len(df)),
        "completed": len(done),
        "failed": int(len(df) - len(done)),
        "duration_s": dur,
        "request_throughput_rps": len(done) / dur if dur > 0 else None,
        "output_token_throughput_tps": float(done["output_tokens"].sum()) / dur if dur > 0 else None,
        "total_token_throughput_tps": float(done["output_tokens"].sum() + done["input_tokens"].sum()) / dur if dur > 0 else None,
        "ttft_s": ref_distribution(done["ttft_s"]),
        "tpot_s": ref_distribution(done["tpot_s"]),
        "e2e_s": ref_distribution(done["e2e_s"]),
        "itl_s": ref_distribution(itl),
        "queue_delay_s": ref_distribution(df["queue_delay_s"]),
        "slo": slo.model_dump(),
        "slo_attainment": float(good.mean()) if len(df) else None,
        "goodput_rps": float(good.sum()) / dur if dur > 0 else None,
    }
    out["schedule"] = ref_schedule_metrics(df, target_rate_rps)
    out["steady_state"] = ref_steady_metrics(df, steady or SteadyState())
    if (harness := ref_harness_metrics(done)) is not None:
        out["harness"] = harness
    for col in ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s"):
        if col in done and done[col].notna().any():
            out[col] = ref_distribution(done[col])
    return out


# ---- sample frames ----


def _raw(rng, i, harness):
    """One request: sends on a 5 ms grid (ties), some failed, 1–5 one-token messages, engine numbers
    sometimes missing, the engine's token times where `harness`."""
    sched = round(float(rng.integers(0, 40)) * 0.005, 3)
    sent = sched + float(rng.choice([0.0, 0.0002, 0.003]))
    ok = bool(rng.random() > 0.15)
    n = int(rng.integers(1, 6)) if ok else 0
    first = sent + float(rng.exponential(0.05))
    chunks = [first + k * float(rng.uniform(0.005, 0.02)) for k in range(n)]
    server = {"server_queue_s": float(rng.uniform(0, 0.01)), "prefill_s": None if rng.random() < 0.3 else 0.02}
    row = {
        "request_id": f"q{i}",
        "warmup": False,
        "input_tokens": int(rng.integers(8, 300)),
        "max_tokens": 5,
        "t_scheduled": sched,
        "t_sent": sent,
        "t_chunks": chunks,
        "chunk_tokens": [1] * n,
        "output_token_ids": list(range(n)),
        "ok": ok,
        "error": None if ok else "boom",
        "server": server,
    }
    if harness and ok:
        row["server_token_s"] = [c - sent - 0.001 for c in chunks]
    return row


def sample(seed, cells=("a", "b", "c"), n=30, harness=True):
    """Cells' rows interleaved in one frame, as requests.parquet holds a run's."""
    rng = np.random.default_rng(seed)
    frames = [to_frame([_raw(rng, i, harness) for i in range(n)], cell_id=c) for c in cells]
    df = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if harness:
        df["harness_hop_s"] = np.where(rng.random(len(df)) < 0.5, 0.0015, np.nan)
        df["client_send_s"] = np.where(rng.random(len(df)) < 0.5, rng.uniform(0, 0.001, len(df)), np.nan)
    return df


def same(a, b):
    """Equal to the bit, NaN included (JSON writes it as NaN on both sides)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


CASES = [
    (SLO(), None, None),
    (SLO(ttft_s=0.05, tpot_s=0.012, e2e_s=0.1), SteadyState(ramp_up=0.0, cool_down=0.0), 40.0),
    (SLO(ttft_s=None, tpot_s=None), SteadyState(ramp_up=0.3, cool_down=0.2), 200.0),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("slo,steady,rate", CASES)
def test_each_cell_matches_the_pandas_formulas(seed, slo, steady, rate):
    df = sample(seed, harness=seed % 2 == 0)
    for _cell, rows in df.groupby("cell_id", sort=False):
        assert same(cell_metrics(rows, slo, steady, rate), ref_cell_metrics(rows, slo, steady, rate))


def test_cells_split_from_one_frame_match_pandas_groupby():
    df = sample(11, cells=tuple(f"c{i}" for i in range(12)), n=9)
    split = CellRows.by_cell(df)
    grouped = dict(tuple(df.groupby("cell_id", sort=False)))
    assert list(split) == list(grouped)
    for cell, rows in grouped.items():
        assert split[cell].n == len(rows)
        assert same(cell_metrics(split[cell], SLO()), ref_cell_metrics(rows, SLO()))


def test_edge_cells_match_the_pandas_formulas():
    df = sample(3, cells=("x",), n=12)
    every_failed = df.assign(ok=False)
    one = df[df["ok"]].head(1)
    no_token_times = df.assign(t_last_token=np.nan)
    for rows in (every_failed, one, no_token_times, df.drop(columns=["itl_s", "harness_hop_s", "client_send_s"])):
        assert same(cell_metrics(rows, SLO(), None, 10.0), ref_cell_metrics(rows, SLO(), None, 10.0))
    assert CellRows.by_cell(df.iloc[:0]) == {}


def test_percentiles_are_numpys_to_the_bit():
    rng = np.random.default_rng(5)
    for n in (*range(1, 40), 101, 997):
        for x in (rng.random(n), rng.integers(0, 4, n).astype(float), rng.normal(1e3, 1e-3, n)):
            assert np.array_equal(percentiles(x), np.percentile(x, PERCENTILES)), n
    assert same(distribution([0.3, None, 0.1, 0.2]), ref_distribution([0.3, None, 0.1, 0.2]))
