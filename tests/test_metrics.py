"""Metric formulas on records computed by hand."""

import math

import pandas as pd
import pytest

from analysis.metrics import SLO, cell_metrics, distribution, meets_slo
from analysis.records import derive, to_frame


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
