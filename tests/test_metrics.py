"""Metric formulas on records computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from analysis.metrics import SLO, burst_sizes, cell_metrics, distribution, meets_slo
from analysis.records import derive, to_frame
from workloads.arrivals import SteadyState
from workloads.requests import WorkloadSpec


def raw(rid, t_sched, t_sent, tokens, ok=True, warm=False, n_in=10, server=None):
    """`tokens`: one arrival time per message of one token each."""
    return {
        "request_id": rid,
        "warmup": warm,
        "input_tokens": n_in,
        "max_tokens": len(tokens),
        "t_scheduled": t_sched,
        "t_sent": t_sent,
        "t_chunks": tokens,
        "chunk_tokens": [1] * len(tokens),
        "output_token_ids": list(range(len(tokens))),
        "ok": ok,
        "error": None if ok else "boom",
        "server": server,
    }


def test_derive_per_request():
    r = derive(raw("a", 0.5, 1.0, [1.2, 1.3, 1.5, 1.6], server={"server_queue_s": 0.01, "prefill_s": 0.1}))
    assert r["ttft_s"] == pytest.approx(0.2)
    assert r["tpot_s"] == pytest.approx((1.6 - 1.2) / 3)
    assert r["e2e_s"] == pytest.approx(0.6)
    assert r["queue_delay_s"] == pytest.approx(0.5)
    assert r["itl_s"] == pytest.approx([0.1, 0.2, 0.1])
    assert r["output_tokens"] == 4
    assert r["prefill_s"] == 0.1 and r["transfer_s"] is None


def test_itl_is_one_gap_per_message_and_tpot_spreads_over_tokens():
    # 5 tokens in 3 messages: [1 token at 1.2] [3 tokens at 1.5] [1 token at 1.6]
    r = {**raw("a", 0.0, 1.0, [1.2, 1.5, 1.6]), "chunk_tokens": [1, 3, 1], "output_token_ids": [7] * 5}
    d = derive(r)
    assert d["itl_s"] == pytest.approx([0.3, 0.1])  # no zero gaps for tokens that came together
    assert d["tpot_s"] == pytest.approx(0.4 / 4)
    assert d["output_tokens"] == 5 and d["ttft_s"] == pytest.approx(0.2) and d["e2e_s"] == pytest.approx(0.6)
    assert "t_chunks" not in d and "chunk_tokens" not in d


def test_single_token_has_no_tpot():
    r = derive(raw("a", 0.0, 0.0, [0.3]))
    assert r["tpot_s"] is None and r["ttft_s"] == pytest.approx(0.3) and r["itl_s"] == []


def test_distribution_hand_computed():
    d = distribution([1.0, 2.0, 3.0, 4.0, None])
    assert d["mean"] == 2.5
    assert d["std"] == pytest.approx(math.sqrt(1.25))
    assert d["p50"] == 2.5
    assert d["p90"] == pytest.approx(3.7)
    assert d["count"] == 4
    assert distribution([])["p99"] is None


def test_cell_metrics_throughput_slo_goodput():
    rows = [
        raw("w", 0.0, 0.0, [5.0, 9.0], warm=True),  # warm-up: must not count
        raw("a", 0.0, 0.0, [0.2, 0.3, 0.4]),  # ttft .2 tpot .1  -> good
        raw("b", 0.0, 1.0, [1.5, 2.5]),  # ttft .5 tpot 1.0 -> misses TPOT
        raw("c", 0.0, 2.0, [3.0, 3.1]),  # ttft 1.0 -> misses TTFT (bound .8)
        raw("d", 0.0, 2.0, [], ok=False),  # failed -> counts against attainment
    ]
    df = to_frame(rows, cell_id="c0")
    m = df[~df["warmup"]]
    out = cell_metrics(m, SLO(ttft_s=0.8, tpot_s=0.2))
    duration = 3.1 - 0.0
    assert out["duration_s"] == pytest.approx(duration)
    assert out["completed"] == 3 and out["failed"] == 1 and out["requests"] == 4
    assert out["request_throughput_rps"] == pytest.approx(3 / duration)
    assert out["output_token_throughput_tps"] == pytest.approx(7 / duration)
    assert out["total_token_throughput_tps"] == pytest.approx((7 + 30) / duration)
    assert out["slo_attainment"] == pytest.approx(1 / 4)
    assert out["goodput_rps"] == pytest.approx(1 / duration)
    assert out["ttft_s"]["p50"] == pytest.approx(0.5)
    assert out["itl_s"]["count"] == 4  # 2 + 1 + 1 gaps


def test_slo_bounds_unset_are_not_checked():
    df = pd.DataFrame({"ok": [True, True], "ttft_s": [5.0, 0.1], "tpot_s": [None, 3.0], "e2e_s": [9.0, 9.0]})
    assert list(meets_slo(df, SLO(ttft_s=None, tpot_s=None))) == [True, True]
    assert list(meets_slo(df, SLO(ttft_s=1.0, tpot_s=None))) == [False, True]
    assert list(meets_slo(df, SLO(ttft_s=None, tpot_s=1.0, e2e_s=10))) == [True, False]


def test_server_reports_never_replace_client_measurements():
    r = raw("a", 0.0, 0.0, [1.0, 1.5], server={"ttft_s": 0.001, "engine": "vllm", "vllm_num_cached_tokens": 7})
    df = to_frame([r], engine="external", cell_id="c")
    assert df["ttft_s"].iloc[0] == pytest.approx(1.0) and df["engine"].iloc[0] == "external"
    assert df["vllm_num_cached_tokens"].iloc[0] == 7


def test_engine_token_times_are_kept():
    r = {**raw("a", 0.0, 0.0, [1.0, 1.5]), "server_token_s": [0.2, 0.7]}
    assert derive(r)["server_token_s"] == [0.2, 0.7]


def _open_loop(n, rate, lag=0.0, ttft=lambda i: 0.05):
    """n requests scheduled every 1/rate s, each sent `lag(i)` late, 3 one-token messages 10 ms apart."""
    lag_of = lag if callable(lag) else (lambda i: lag)
    rows = []
    for i in range(n):
        sched = i / rate
        sent = sched + lag_of(i)
        first = sent + ttft(i)
        rows.append(raw(f"r{i}", sched, sent, [first, first + 0.01, first + 0.02]))
    return to_frame(rows, cell_id="c")


def test_schedule_kept_when_lag_small_and_rate_reached():
    out = cell_metrics(_open_loop(100, 50.0, lag=0.0002), SLO(), target_rate_rps=50.0)["schedule"]
    assert out["target_rate_rps"] == 50.0
    assert out["scheduled_rate_rps"] == pytest.approx(50.0) and out["achieved_rate_rps"] == pytest.approx(50.0)
    assert out["send_lag_s"]["p99"] == pytest.approx(0.0002) and out["send_lag_s"]["max"] == pytest.approx(0.0002)
    assert out["schedule_kept"] is True


def test_schedule_not_kept_when_sends_fall_behind():
    # Each send 1 ms later than the one before: the generator only reached a lower rate.
    out = cell_metrics(_open_loop(100, 200.0, lag=lambda i: 0.001 * i), SLO(), target_rate_rps=200.0)["schedule"]
    assert out["achieved_rate_rps"] == pytest.approx(1 / (1 / 200 + 0.001))
    assert out["send_lag_s"]["max"] == pytest.approx(0.099)
    assert out["schedule_kept"] is False
    # A closed loop has no schedule to keep.
    assert cell_metrics(_open_loop(20, 10.0), SLO())["schedule"]["schedule_kept"] is None


def _closed_loop(sends):
    return to_frame([raw(f"r{i}", t, t, [t + 0.1, t + 0.11]) for i, t in enumerate(sends)], cell_id="c")


def test_lockstep_share_counts_sends_in_bursts_of_four_or_more_users():
    # Waves of 6 users sending 1 ms apart every 0.5 s, plus 4 stragglers 100 ms apart: 24 of 28 in lockstep.
    waves = [w * 0.5 + u * 0.001 for w in range(4) for u in range(6)]
    stragglers = [2.2 + 0.1 * i for i in range(4)]
    share = cell_metrics(_closed_loop(waves + stragglers), SLO())["schedule"]["lockstep_share"]
    assert share == pytest.approx(24 / 28)
    # Staggered users (a send every 60 ms) never form a burst; three at once are not yet one.
    assert cell_metrics(_closed_loop([0.06 * i for i in range(20)]), SLO())["schedule"]["lockstep_share"] == 0.0
    assert cell_metrics(_closed_loop([0.0, 0.001, 0.002, 1.0, 1.001, 1.002]), SLO())["schedule"]["lockstep_share"] == 0.0
    # Sends closer than 20 ms but evenly spread (100/s) are a fast stream, not a wave: a burst needs
    # its gaps under a quarter of the mean gap too. Waves at that rate still count.
    assert cell_metrics(_closed_loop([0.01 * i for i in range(40)]), SLO())["schedule"]["lockstep_share"] == 0.0
    fast_waves = [w * 0.05 + u * 0.0005 for w in range(8) for u in range(5)]  # 100/s, in waves of 5
    assert cell_metrics(_closed_loop(fast_waves), SLO())["schedule"]["lockstep_share"] == 1.0
    # An open loop's bursts are its schedule's own: not reported.
    assert cell_metrics(_open_loop(50, 500.0), SLO(), target_rate_rps=500.0)["schedule"]["lockstep_share"] is None


def test_burst_sizes_keep_the_sends_order_and_skip_what_never_left():
    sent = np.array([1.0, 0.0, 0.01, np.nan, 0.015, 2.0])  # 0.0, 0.01, 0.015 within 20 ms of each other
    assert burst_sizes(sent).tolist() == [1, 3, 3, 0, 3, 1]
    assert burst_sizes(np.array([np.nan])).tolist() == [0] and burst_sizes(np.array([])).tolist() == []


def test_steady_window_and_unsteady_signal():
    flat = cell_metrics(_open_loop(100, 50.0), SLO())["steady_state"]
    assert flat["steady"] is True and flat["requests"] == 80  # sends 0.20 … 1.78 s, inside [0.198, 1.782]
    assert flat["window_s"] == pytest.approx([0.198, 1.782])
    assert flat["ttft_p50_by_quartile_s"] == pytest.approx([0.05] * 4)
    growing = cell_metrics(_open_loop(100, 50.0, ttft=lambda i: 0.05 + 0.01 * i), SLO())["steady_state"]
    assert growing["steady"] is False
    q = growing["ttft_p50_by_quartile_s"]
    assert q == sorted(q) and q[3] > 1.5 * q[0]
    # The window is configurable; the headline numbers stay over every measured request.
    whole = cell_metrics(_open_loop(100, 50.0), SLO(), SteadyState(ramp_up=0.0, cool_down=0.0))
    assert whole["steady_state"]["requests"] == 100 and whole["requests"] == 100


def test_steady_state_config_is_validated():
    with pytest.raises(ValidationError, match="ramp_up \\+ cool_down must be below 1"):
        SteadyState(ramp_up=0.6, cool_down=0.5)
    with pytest.raises(ValidationError):
        WorkloadSpec.model_validate({"steady_state": {"ramp_up": -0.1}})
    assert WorkloadSpec.model_validate({"steady_state": {"ramp_up": 0.2}}).steady_state.ramp_up == 0.2


def test_harness_share_is_client_minus_engine_per_request():
    # Engine: first token 40 ms after it got the request, then 10 ms per token; the client saw 50 ms and ~10.5 ms.
    rows = [{**raw(f"r{i}", 0.0, 1.0, [1.05, 1.0605, 1.071]), "server_token_s": [0.04, 0.05, 0.06]} for i in range(4)]
    df = to_frame(rows, cell_id="c").assign(harness_hop_s=0.002)
    assert df["harness_ttft_s"].iloc[0] == pytest.approx(0.01)
    h = cell_metrics(df, SLO())["harness"]
    assert h["hop_s"] == 0.002
    assert h["ttft_s"]["p50"] == pytest.approx(0.01) and h["ttft_s_net"]["p50"] == pytest.approx(0.04)
    assert h["tpot_s"]["p50"] == pytest.approx(0.0005) and h["tpot_s_net"]["p50"] == pytest.approx(0.01)
    assert h["e2e_s"]["p50"] == pytest.approx(0.011) and h["e2e_s_net"]["p50"] == pytest.approx(0.06)
    assert h["share_of_ttft_p50"] == pytest.approx(0.2)
    # An external server reports no token times and has no hop probe: nothing to split.
    assert "harness" not in cell_metrics(_open_loop(10, 10.0), SLO())


def test_time_columns_are_floats_whatever_a_record_holds():
    rows = [raw("a", 0.0, 0.0, [1.0, 1.5], server={"prefill_s": "0.25", "transfer_s": "n/a"}), raw("b", 0.0, 0.0, [], ok=False)]
    df = to_frame(rows, cell_id="c")
    for col in ("ttft_s", "tpot_s", "t_first_token", "prefill_s", "transfer_s", "server_queue_s", "harness_ttft_s"):
        assert df[col].dtype == "float64", col
    assert df["prefill_s"].iloc[0] == 0.25 and df["transfer_s"].isna().all() and math.isnan(df["ttft_s"].iloc[1])
    assert list(df["cell_id"]) == ["c", "c"] and to_frame([], cell_id="c").empty
