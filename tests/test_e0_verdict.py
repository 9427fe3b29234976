"""The E0 verdict rule on hand-made records: each correctness check can fail the verdict on its own;
timing alone never makes identical tokens "not reproducible"."""

import pandas as pd
import pytest

from analysis.tracks.e0 import ANALYSIS


def frame(tokens_b=None, slow_b=1.0, n=4, jitter=0.0):
    rows = []
    for cell, slow in (("rep0", 1.0), ("rep1", slow_b)):
        for i in range(n):
            if jitter:  # alternate blocks of fast and slow requests: a repeat that measures its own noise
                slow = (slow_b if cell == "rep1" else 1.0) * (1 + jitter * (-1) ** (i // (n // 4)))
            toks = [i, i + 1, i + 2]
            if cell == "rep1" and tokens_b is not None and i == 2:
                toks = tokens_b
            t0 = i * 1.0
            rows.append(
                {
                    "cell_id": cell,
                    "request_id": f"r{i}",
                    "warmup": False,
                    "ok": True,
                    "input_tokens": 5,
                    "output_tokens": 3,
                    "t_sent": t0,
                    "t_scheduled": t0,
                    "queue_delay_s": 0.0,
                    "t_first_token": t0 + 0.1 * slow,
                    "t_last_token": t0 + 0.3 * slow,
                    "ttft_s": 0.1 * slow,
                    "tpot_s": 0.1 * slow,
                    "e2e_s": 0.3 * slow,
                    "itl_s": [0.1 * slow] * 2,
                    "output_token_ids": toks,
                }
            )
    return pd.DataFrame(rows)


CELLS = {"rep0": {"config_hash": "h"}, "rep1": {"config_hash": "h"}}


def test_identical_runs_are_reproducible():
    v = ANALYSIS.verdicts(frame(), CELLS, {"tolerance": 0.1})
    assert v["verdict"] == "reproducible", v


def test_one_different_token_fails():
    v = ANALYSIS.verdicts(frame(tokens_b=[2, 3, 99]), CELLS, {"tolerance": 0.1})
    assert v["verdict"] == "not reproducible"
    bad = [c for c in v["checks"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["greedy token ids identical request by request"]
    assert bad[0]["detail"]["mismatches"] == ["rep0/rep1:r2"]


def test_latency_beyond_tolerance_and_noise_is_unstable_timing_not_irreproducibility():
    v = ANALYSIS.verdicts(frame(slow_b=1.5), CELLS, {"tolerance": 0.2})
    assert v["verdict"] == "reproducible, timing unstable"
    assert v["correctness"] == "pass" and v["timing"] == "unstable"
    bad = [c for c in v["checks"] if not c["ok"]]
    assert bad and all(c["kind"] == "timing" for c in bad)
    assert any(c["check"].startswith("TTFT median") for c in bad)
    assert ANALYSIS.verdicts(frame(slow_b=1.1), CELLS, {"tolerance": 0.2})["verdict"] == "reproducible"


def test_timing_difference_inside_the_measured_noise_passes():
    """A repeat whose own blocks scatter by ±40% cannot call a 30% difference between repeats real."""
    quiet = ANALYSIS.verdicts(frame(slow_b=1.3, n=16), CELLS, {"tolerance": 0.2})
    assert quiet["timing"] == "unstable"
    noisy = ANALYSIS.verdicts(frame(slow_b=1.3, n=16, jitter=0.4), CELLS, {"tolerance": 0.2})
    ttft = next(c for c in noisy["checks"] if c["check"].startswith("TTFT median"))
    assert ttft["detail"]["allowed"] > 0.3 and ttft["ok"], ttft
    assert noisy["verdict"] == "reproducible"


def test_report_and_headline_separate_correctness_timing_and_host_load():
    v = ANALYSIS.verdicts(frame(slow_b=1.5), CELLS, {"tolerance": 0.2})
    load = {
        "cores": 2,
        "wall_s": 9.0,
        "load_avg_1m": 3.5,
        "cpu_busy_percent": 99.0,
        "cpu_steal_percent": 1.5,
        "other_processes_cpu_percent": 61.0,
    }
    summary = {"verdicts": v, "cells": {c: {"host_load": load} for c in CELLS}}
    secs = ANALYSIS.sections(frame(), summary)
    assert [s.title for s in secs] == ["E0 verdict: reproducible, timing unstable", "E0 timing: unstable"]
    assert set(secs[0].table["result"]) == {"pass"}
    assert "ms" in secs[1].table["evidence"].iloc[1] and "{" not in "".join(secs[1].table["evidence"])
    head = {h.label: h.value for h in ANALYSIS.headline(summary)}
    assert head["correctness"].startswith("pass") and head["timing"].startswith("unstable")
    assert head["host load"] == "load average up to 3.50 on 2 cores; other processes up to 61% CPU, steal up to 1.5%"


def test_config_hash_mismatch_fails():
    v = ANALYSIS.verdicts(frame(), {"rep0": {"config_hash": "a"}, "rep1": {"config_hash": "b"}}, {"tolerance": 0.5})
    assert v["verdict"] == "not reproducible"


def test_a_crashed_repeat_makes_the_verdict_incomplete():
    df = frame()
    v = ANALYSIS.verdicts(df[df["cell_id"] == "rep0"], {"rep0": {"config_hash": "h"}}, {"tolerance": 0.5, "repeats": 2})
    assert v["verdict"] == "incomplete"


def test_different_engine_weights_fail():
    cells = {c: {"config_hash": "h", "engine_info": {"extra": {"weight_checksum": w}}} for c, w in (("rep0", "a"), ("rep1", "b"))}
    v = ANALYSIS.verdicts(frame(), cells, {"tolerance": 0.5})
    assert v["verdict"] == "not reproducible"
    assert [c["check"] for c in v["checks"] if not c["ok"]] == ["engine weights identical"]
    same = {c: {"config_hash": "h", "engine_info": {"extra": {"weight_checksum": "a"}}} for c in ("rep0", "rep1")}
    assert ANALYSIS.verdicts(frame(), same, {"tolerance": 0.5})["verdict"] == "reproducible"


def rounds_frame(n=8, rounds=2, slow_round1_b=1.0, bad_token=None):
    """Two repeats interleaved in `rounds` cells each; send times restart at 0 in every cell, as they do in a run."""
    rows, cells = [], {}
    for r in range(rounds):
        ids = range(r * n // rounds, (r + 1) * n // rounds)
        for rep in (0, 1):
            cell = f"rep{rep}.round{r}"
            cells[cell] = {"config_hash": f"h{r}", "labels": {"repeat": rep, "round": r}}
            slow = slow_round1_b if (rep == 1 and r == 1) else 1.0
            for k, i in enumerate(ids):
                toks = bad_token if (bad_token and rep == 1 and i == n - 1) else [i, i + 1]
                t0 = k * 1.0
                rows.append(
                    {
                        "cell_id": cell,
                        "request_id": f"r{i}",
                        "warmup": False,
                        "ok": True,
                        "output_tokens": 2,
                        "t_sent": t0,
                        "t_last_token": t0 + 0.5 * slow,
                        "ttft_s": 0.1 * slow,
                        "tpot_s": 0.4 * slow,
                        "e2e_s": 0.5 * slow,
                        "output_token_ids": toks,
                    }
                )
            rows.append({**rows[-1], "request_id": "w0000", "warmup": True})  # warm-up rows never count
    return pd.DataFrame(rows), cells


def test_rounds_merge_into_their_repeat():
    df, cells = rounds_frame()
    v = ANALYSIS.verdicts(df, cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    assert v["verdict"] == "reproducible" and v["rounds"] == 2, v
    tokens = next(c for c in v["checks"] if c["check"].startswith("greedy"))
    assert tokens["detail"]["requests_compared"] == 8, "a repeat's rounds together hold every request"
    thr = next(c for c in v["checks"] if c["check"].startswith("output token throughput"))
    # 8 requests × 2 tokens over two rounds of 3.5 s each: the time between a repeat's rounds is not its time.
    assert thr["detail"]["values"] == {"rep0": pytest.approx(16 / 7), "rep1": pytest.approx(16 / 7)}
    # Each round is its own cell config: hashes differ between rounds, agree within one.
    assert next(c for c in v["checks"] if c["check"] == "config hash identical")["ok"]


def test_a_mismatch_in_a_later_round_names_the_repeats_and_request():
    df, cells = rounds_frame(bad_token=[0, 0])
    v = ANALYSIS.verdicts(df, cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    assert v["verdict"] == "not reproducible"
    assert next(c for c in v["checks"] if c["check"].startswith("greedy"))["detail"]["mismatches"] == ["rep0/rep1:r7"]


def test_one_slow_round_is_that_repeats_own_measured_noise():
    """rep1's second round ran twice as slow: its medians move past the tolerance, but its blocks (one per
    round here) measured that spread themselves, so the run calls it noise, not a timing difference."""
    df, cells = rounds_frame(slow_round1_b=2.0)
    v = ANALYSIS.verdicts(df, cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    e2e = next(c for c in v["checks"] if c["check"].startswith("E2E median"))
    assert e2e["detail"]["values"]["rep0"] == pytest.approx(0.5) and e2e["detail"]["max_relative_difference"] > 0.1
    assert e2e["detail"]["noise_relative_se"]["rep0"] == 0 < e2e["detail"]["noise_relative_se"]["rep1"]
    assert e2e["ok"] and v["verdict"] == "reproducible"


def test_a_round_config_that_differs_between_repeats_fails():
    df, cells = rounds_frame()
    cells["rep1.round1"] = {**cells["rep1.round1"], "config_hash": "other"}
    v = ANALYSIS.verdicts(df, cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    assert [c["check"] for c in v["checks"] if not c["ok"]] == ["config hash identical"]


def test_a_missing_round_makes_the_verdict_incomplete():
    df, cells = rounds_frame()
    del cells["rep1.round1"]
    v = ANALYSIS.verdicts(df[df["cell_id"] != "rep1.round1"], cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    assert v["verdict"] == "incomplete" and v["checks"][0]["detail"]["finished"] == ["rep0"]


def test_report_says_the_repeats_were_interleaved():
    df, cells = rounds_frame()
    v = ANALYSIS.verdicts(df, cells, {"tolerance": 0.1, "repeats": 2, "rounds": 2})
    text = ANALYSIS.sections(df, {"verdicts": v, "cells": cells})[0].text[0]
    assert "ran 2 times with the same seed, the repeats interleaved in 2 rounds" in text
    one = ANALYSIS.sections(frame(), {"verdicts": ANALYSIS.verdicts(frame(), CELLS, {"tolerance": 0.1}), "cells": CELLS})
    assert "ran 2 times with the same seed. Reproducible" in one[0].text[0]
