"""E1, E4, E5, E6 end to end on the real reference engine and a local Ray, small grids."""

import json

import pandas as pd
import pytest

from cluster.config import resolve
from cluster.driver import Driver, RunOptions
from workloads.datasets import DatasetSpec, load_subset


def run(track, tmp_path_factory, overrides):
    return Driver(resolve(track, overrides), RunOptions(out_dir=tmp_path_factory.mktemp(track))).run()


def read(run_dir, name):
    return json.loads((run_dir / name).read_text())


@pytest.fixture(scope="module")
def e4(ray_local, tmp_path_factory):
    return run("e4", tmp_path_factory, {"params": {"datasets": [{"family": "gsm8k", "n": 4, "max_tokens": 6}, {"family": "mmlu", "n": 3}]}})


def test_e4_subset_in_manifest_scored_in_summary(e4):
    m, s = read(e4, "manifest.json"), read(e4, "summary.json")
    assert m["status"] == "complete" and m["model"]["random_weights"] is True
    sub = m["provenance"]["gsm8k"]["dataset_subset"]
    assert sub["ids"] == load_subset(DatasetSpec(family="gsm8k", n=4)).provenance["ids"]
    assert sub["ids_sha256"] and sub["rows"] == 64 and sub["selection"] == "n=4"
    acc = s["verdicts"]["accuracy"]
    assert (acc["gsm8k"]["items"], acc["mmlu"]["items"]) == (4, 3)
    df = pd.read_parquet(e4 / "requests.parquet")
    measured = df[~df["warmup"]]
    assert measured["meta"].notna().all() and "output_text" in df
    assert {json.loads(x)["item_id"] for x in measured[measured["cell_id"] == "gsm8k"]["meta"]} == set(sub["ids"])
    md = (e4 / "report.md").read_text()
    assert "Random weights" in md and "E4: accuracy on deterministic subsets" in md


@pytest.fixture(scope="module")
def e5(ray_local, tmp_path_factory):
    return run("e5", tmp_path_factory, {"params": {"contexts": [64, 160], "concurrencies": [1, 3], "output_len": 32}})


def test_e5_measured_kv_equals_the_analytic_model(e5):
    mem, s = read(e5, "memory.json"), read(e5, "summary.json")
    assert set(mem) == {"ctx64-c1", "ctx64-c3", "ctx160-c1", "ctx160-c3"}
    kvb = read(e5, "manifest.json")["model"]["kv_bytes_per_token"]
    for cell, rep in mem.items():
        ctx, c = (int(x) for x in cell[3:].split("-c"))
        assert rep["measured"] and rep["kv_cache_bytes"] == c * ctx * kvb, cell
        parts = rep["weights_bytes"] + rep["kv_cache_bytes"] + rep["activation_peak_bytes"] + rep["other_bytes"]
        assert rep["total_bytes"] == parts
    v = s["verdicts"]
    assert v["kv_measured_over_analytic"] == {"min": 1.0, "max": 1.0}
    assert v["weights_measured_over_analytic"] == pytest.approx(1.0, abs=1e-3)
    assert [f["measured_max_concurrency"] for f in v["fits"]] == [3, 3]
    assert "E5: largest concurrency that fits" in (e5 / "report.md").read_text()


def test_e5_budget_limits_what_fits(e5):
    """Rebuild the verdict with a budget between the cells' peaks: fewer cells fit."""
    from analysis.packet import load_packet
    from analysis.tracks.e5 import ANALYSIS

    p = load_packet(e5)
    cells = {c: {**json.loads((e5 / "cells" / c / "cell.json").read_text()), "metrics": None} for c in p.summary["cells"]}
    totals = sorted(m["memory"]["total_bytes"] for m in cells.values())

    def fits(budget):
        v = ANALYSIS.verdicts(p.requests, cells, {"memory_budget_gib": budget / 2**30})
        assert v["budget_source"] == "params.memory_budget_gib"
        return [f["measured_max_concurrency"] for f in v["fits"]], [f["analytic_max_concurrency"] for f in v["fits"]]

    assert fits(totals[-1])[0] == [3, 3]
    assert fits(totals[0] - 1)[0] == [0, 0]
    # The analytic answer shrinks with the context: twice the tokens per sequence, about half as many.
    analytic = fits(totals[-1] + 64 * 2**20)[1]
    assert analytic[0] > analytic[1] > 0


@pytest.fixture(scope="module")
def e6(ray_local, tmp_path_factory):
    return run(
        "e6",
        tmp_path_factory,
        {"params": {"native_context": 300, "multipliers": [1, 2], "depths": [0.5], "samples_per_depth": 1, "max_tokens": 4}},
    )


def test_e6_rungs_run_with_their_rope_and_exact_lengths(e6):
    s = read(e6, "summary.json")
    rungs = {r["cell"]: r for r in s["verdicts"]["rungs"]}
    assert rungs["x1-ctx300"]["rope"]["rope_type"] == "default"
    assert rungs["x2-ctx600"]["rope"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 300, "rope_theta": 1e6}
    assert all(r["memory_total_bytes"] > 0 and r["passkeys"] == 1 for r in rungs.values())
    df = pd.read_parquet(e6 / "requests.parquet")
    assert set(df["input_tokens"] + df["output_tokens"]) == {300, 600}
    assert "Random weights" in (e6 / "report.md").read_text()


def test_e1_heatmaps_and_slopes(ray_local, tmp_path_factory):
    # 16 vs 1024 prompt tokens: a prefill-cost gap (~0.2 s) no scheduling hiccup on a loaded box hides.
    d = run("e1", tmp_path_factory, {"workload": {"num_requests": 3}, "params": {"input_lens": [16, 1024], "output_lens": [4, 8]}})
    v = read(d, "summary.json")["verdicts"]
    assert len(v["grid"]) == 4 and v["ttft_s_per_input_token"] > 0
    html = (d / "report.html").read_text()
    assert '"type":"heatmap"' in html and "E1: latency vs lengths" in html
