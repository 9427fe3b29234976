"""Track E3 end to end on a real local Ray, and its analysis on hand-made records."""

import json
import re

import pandas as pd
import pytest

from analysis.tracks.e3 import ANALYSIS as E3
from analysis.transfers import bytes_vs_analytic, transfer_metrics, transfers_frame, with_stall_ratio
from cluster.config import ConfigError, resolve
from cluster.driver import Driver, RunOptions
from cluster.planning import cell_hash, plan_cells, preflight

SMALL = {
    "workload": {
        "num_requests": 6,
        "warmup_requests": 1,
        "input_len": {"kind": "uniform", "low": 16, "high": 300},
        "output_len": {"kind": "fixed", "value": 8},
        "arrival": {"kind": "closed", "concurrency": 3},
    }
}


def test_e3_plans_both_modes_on_equal_engine_counts():
    cfg = resolve("e3")
    plans = plan_cells(cfg)
    assert [(p.cell_id, p.serving_mode, p.replicas) for p in plans] == [
        ("aggregated", "aggregated", 2),
        ("disaggregated", "disaggregated", 1),
    ]
    assert plans[0].workload == plans[1].workload and plans[0].seed_offset == plans[1].seed_offset
    assert cfg.kv_transfer.max_group_bytes == 256 * 1024
    # Replica count and KV transfer settings are part of what a cell's hash covers.
    other = resolve("e3", {"kv_transfer": {"max_group_bytes": 1024}})
    assert cell_hash(cfg, plans[1]) != cell_hash(other, plan_cells(other)[1])


@pytest.mark.parametrize(
    "data,field",
    [
        ({"kv_transfer": {"max_group_bytes": 0}}, "kv_transfer.max_group_bytes"),
        ({"kv_transfer": {"fetch_timeout_s": -1}}, "kv_transfer.fetch_timeout_s"),
        ({"kv_transfer": {"bogus": 1}}, "kv_transfer.bogus"),
    ],
)
def test_bad_kv_transfer_fields_are_named(data, field):
    with pytest.raises(ConfigError, match=f"  {field}:"):
        resolve("e3", data)


def test_e3_run_oracle_identical_and_bytes_equal_analytic(ray_local, tmp_path):
    cfg = resolve("e3", SMALL)
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert manifest["status"] == "complete", manifest["cells"]
    assert summary["verdicts"]["verdict"] == "identical"
    assert all(c["ok"] for c in summary["verdicts"]["checks"]), summary["verdicts"]["checks"]

    req = pd.read_parquet(run_dir / "requests.parquet")
    t = pd.read_parquet(run_dir / "transfers.parquet")
    dis = req[req["serving_mode"] == "disaggregated"]
    assert len(t) == len(dis) == 7 and t["ok"].all()
    # Byte counts equal the analytic KV size of each request's prompt (no block padding here).
    bpt = manifest["model"]["kv_bytes_per_token"]
    prompt = dis.set_index("request_id")["input_tokens"]
    assert (t.set_index("request_id")["bytes"] == prompt * bpt).all()
    assert (t["bytes"] == t["analytic_bytes"]).all()
    # TTFT breakdown filled for disaggregated rows, transfer null for aggregated ones.
    for col in ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s"):
        assert dis[col].notna().all(), col
    assert req.loc[req["serving_mode"] == "aggregated", "transfer_s"].isna().all()
    cell = json.loads((run_dir / "cells" / "disaggregated" / "cell.json").read_text())
    assert cell["kv_directory_at_end"]["groups"] == 0
    agg_cell = json.loads((run_dir / "cells" / "aggregated" / "cell.json").read_text())
    assert sum(agg_cell["requests_per_replica"]) == 7 and min(agg_cell["requests_per_replica"]) >= 1

    moved = summary["cells"]["disaggregated"]["transfers"]
    assert moved["transfers"] == 6 and moved["failed"] == 0  # measured ones; the warm-up is left out
    assert moved["bytes_total"] == moved["analytic_bytes_total"] == int(t.loc[~t["warmup"], "bytes"].sum())
    assert moved["stall_ratio"]["count"] == 6 and 0 < moved["stall_ratio"]["p50"] < 1
    assert "transfers" not in summary["cells"]["aggregated"]
    report = (run_dir / "report.md").read_text()
    for title in ("E3 oracle verdict: identical", "Aggregated vs disaggregated", "TTFT breakdown", "KV transfer accounting"):
        assert title in report
    assert (run_dir / "report.html").read_text().count("plotly-graph-div") >= 5


def test_spread_on_one_node_fails_the_cells_with_the_field_named(ray_local, tmp_path):
    cfg = resolve("e3", {**SMALL, "placement": {"strategy": "SPREAD"}})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    for c in manifest["cells"].values():
        assert "placement.strategy: SPREAD puts each of this cell's 2 engines on its own node" in c["error"]


# --- analysis on hand-made records --------------------------------------------------------------
def _requests(tokens_agg, tokens_dis, ok_dis=True):
    rows = []
    for mode, toks in (("aggregated", tokens_agg), ("disaggregated", tokens_dis)):
        for i, t in enumerate(toks):
            rows.append(
                {
                    "cell_id": mode,
                    "serving_mode": mode,
                    "request_id": f"r{i}",
                    "ok": ok_dis or mode == "aggregated",
                    "output_token_ids": t,
                    "e2e_s": 2.0,
                    "warmup": False,
                }
            )
    return pd.DataFrame(rows)


def _transfers(n, ok=True, extra_bytes=0):
    return transfers_frame(
        [
            {
                "run_id": "x",
                "cell_id": "disaggregated",
                "request_id": f"r{i}",
                "key": f"r{i}/k",
                "tokens": 10,
                "groups": 2,
                "bytes": 400 + extra_bytes,
                "analytic_bytes": 400,
                "extract_s": 0.01,
                "put_s": 0.02,
                "wait_ref_s": 0.1,
                "fetch_s": 0.1,
                "get_s": 0.01,
                "inject_s": 0.02,
                "total_s": 0.3,
                "stall_s": 0.2,
                "src_node": "a",
                "dst_node": "b",
                "ok": ok,
                "error": None if ok else "KVUnavailable: no reference",
            }
            for i in range(n)
        ],
        {},
    )


CELLS = {"aggregated": {"serving_mode": "aggregated"}, "disaggregated": {"serving_mode": "disaggregated"}}


def test_verdicts_identical_different_incomplete():
    same = E3.verdicts_with_transfers(_requests([[1, 2], [3]], [[1, 2], [3]]), _transfers(2), CELLS, {})
    assert same["verdict"] == "identical" and all(c["ok"] for c in same["checks"])
    diff = E3.verdicts_with_transfers(_requests([[1, 2], [3]], [[1, 2], [4]]), _transfers(2), CELLS, {})
    assert diff["verdict"] == "different"
    assert diff["checks"][1]["detail"]["mismatches"] == ["r1"]
    failed = E3.verdicts_with_transfers(_requests([[1]], [[1]], ok_dis=False), _transfers(1), CELLS, {})
    assert failed["verdict"] == "incomplete"
    one_mode = E3.verdicts_with_transfers(_requests([[1]], [[1]]), None, {"aggregated": CELLS["aggregated"]}, {})
    assert one_mode["verdict"] == "incomplete"


def test_recomputed_transfers_and_extra_bytes_fail_their_checks_but_not_the_oracle():
    v = E3.verdicts_with_transfers(_requests([[1]], [[1]]), _transfers(1, ok=False), CELLS, {})
    assert v["verdict"] == "identical"
    checks = {c["check"]: c for c in v["checks"]}
    assert not checks["every KV transfer succeeded (none recomputed)"]["ok"]
    v = E3.verdicts_with_transfers(_requests([[1]], [[1]]), _transfers(1, extra_bytes=1000), CELLS, {})
    bad = {c["check"]: c for c in v["checks"]}["bytes moved = analytic KV size of each prompt (within block padding)"]
    assert not bad["ok"] and bad["detail"] == {"exact": 0, "within_padding": 0, "outside": 1}


def test_bytes_vs_analytic_allows_less_than_one_block_of_padding():
    t = pd.concat([_transfers(1), _transfers(1, extra_bytes=40 * 15), _transfers(1, extra_bytes=40 * 16), _transfers(1, extra_bytes=-40)])
    # 40 bytes per token; block of 16 tokens: up to 15 tokens of padding pass, 16 or fewer bytes do not.
    assert bytes_vs_analytic(t, block_tokens=16) == {"exact": 1, "within_padding": 1, "outside": 2}
    assert bytes_vs_analytic(t) == {"exact": 1, "within_padding": 0, "outside": 3}


def test_transfer_metrics_totals_throughput_and_stall_ratio():
    t = pd.concat([_transfers(3), _transfers(1, ok=False)], ignore_index=True)
    t["request_id"] = ["r0", "r1", "r2", "r3"]
    req = pd.DataFrame({"cell_id": "disaggregated", "request_id": ["r0", "r1", "r2", "r3"], "e2e_s": [1.0, 2.0, 4.0, 4.0]})
    m = transfer_metrics(with_stall_ratio(t, req))
    assert (m["transfers"], m["ok"], m["failed"]) == (4, 3, 1)
    assert m["failure_reasons"] == {"KVUnavailable: no reference": 1}
    assert m["bytes_total"] == m["analytic_bytes_total"] == 1200 and m["overhead_ratio"] == 0.0
    assert m["stage_totals_s"]["fetch_s"] == pytest.approx(0.3)
    assert m["throughput_bytes_per_s"]["put_s"]["p50"] == pytest.approx(400 / 0.02)
    assert "wait_ref_s" not in m["throughput_bytes_per_s"]
    assert m["stall_ratio"]["mean"] == pytest.approx((0.2 + 0.1 + 0.05) / 3)


# --- several KV backends as cells of one run ---------------------------------------------------------
def test_e3_backends_give_one_disaggregated_cell_each_with_its_own_hash():
    cfg = resolve("e3", {"params": {"backends": ["ray-object-store", "nixl-vllm"]}})
    plans = plan_cells(cfg)
    assert [(p.cell_id, p.kv_backend) for p in plans] == [
        ("aggregated", None),
        ("disaggregated-ray-object-store", "ray-object-store"),
        ("disaggregated-nixl-vllm", "nixl-vllm"),
    ]
    assert len({p.workload for p in plans}) == 1 and len({p.seed_offset for p in plans}) == 1
    assert cell_hash(cfg, plans[1]) != cell_hash(cfg, plans[2])
    # The default backend's cell hashes as the config's own disaggregated cell did before backends were cells.
    assert cell_hash(cfg, plans[1]) == cell_hash(resolve("e3"), plan_cells(resolve("e3"))[1])


@pytest.mark.parametrize("backends,needle", [([], "params.backends"), (["ray-object-store", "ray-object-store"], "params.backends")])
def test_e3_backends_must_be_distinct_and_not_empty(backends, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve("e3", {"params": {"backends": backends}})


def test_an_unknown_backend_cell_is_refused_before_anything_runs():
    cfg = resolve("e3", {"params": {"backends": ["carrier-pigeon"]}})
    with pytest.raises(
        ConfigError, match=re.escape("params.backends: cell disaggregated-carrier-pigeon asks for KV backend 'carrier-pigeon'")
    ):
        preflight(cfg, plan_cells(cfg))


def test_e3_run_with_three_backends_refuses_nixl_vllm_on_the_reference_engine_and_judges_the_others(ray_local, tmp_path):
    backends = ["ray-object-store", "ray-rdt-nixl", "nixl-vllm"]
    cfg = resolve("e3", {**SMALL, "params": {"backends": backends}})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    cells = manifest["cells"]
    assert manifest["status"] == "complete", cells
    assert cells["disaggregated-ray-object-store"]["status"] == "ok"
    assert cells["disaggregated-ray-rdt-nixl"]["status"] == "ok", cells["disaggregated-ray-rdt-nixl"]
    refused = cells["disaggregated-nixl-vllm"]
    assert refused["status"] == "refused"
    assert refused["error"] == "engine.kind: the nixl-vllm KV backend moves the KV of vllm engines, not 'reference'"
    v = summary["verdicts"]
    assert v["verdict"] == "identical" and list(v["backends"]) == ["disaggregated-ray-object-store", "disaggregated-ray-rdt-nixl"]
    assert v["backends"]["disaggregated-ray-rdt-nixl"]["backend"] == "ray-rdt-nixl"
    # pdbench's own transport either way: every byte counted against the analytic size, per backend
    assert all(c["ok"] for c in v["backends"]["disaggregated-ray-rdt-nixl"]["checks"])
    assert any("bytes moved" in c["check"] for c in v["backends"]["disaggregated-ray-rdt-nixl"]["checks"])
    t = pd.read_parquet(run_dir / "transfers.parquet")
    assert set(t["backend"]) == {"ray-object-store", "ray-rdt-nixl"} and t["ok"].all()
    rdt = t[t["backend"] == "ray-rdt-nixl"]
    assert (rdt["bytes"] == rdt["analytic_bytes"]).all() and rdt["get_s"].notna().all()
    report = (run_dir / "report.md").read_text()
    assert "Refused cells" in report and "not 'reference'" in report
    assert "disaggregated-nixl-vllm" in report and "nixl-vllm / refused" in report and "ray-object-store / ok" in report
    assert "ray-rdt-nixl / ok" in report


def test_verdict_per_backend_and_the_run_takes_the_worst():
    req = pd.concat(
        [
            _requests([[1, 2], [3]], [[1, 2], [3]]),
            _requests([[1, 2], [3]], [[1, 2], [4]]).query("serving_mode == 'disaggregated'").assign(cell_id="disaggregated-nixl-vllm"),
        ]
    )
    t = pd.concat([_transfers(2), _transfers(2).assign(cell_id="disaggregated-nixl-vllm", bytes=pd.NA)])
    cells = {
        **CELLS,
        "disaggregated-nixl-vllm": {"serving_mode": "disaggregated", "labels": {"kv_backend": "nixl-vllm"}},
    }
    v = E3.verdicts_with_transfers(req, transfers_frame(t.to_dict("records"), {}), cells, {})
    assert v["verdict"] == "different"
    assert v["backends"]["disaggregated"]["verdict"] == "identical"
    nixl = v["backends"]["disaggregated-nixl-vllm"]
    assert nixl["backend"] == "nixl-vllm" and nixl["verdict"] == "different"
    # Bytes the backend moves out of pdbench's sight are not checked against the analytic size.
    assert not any("bytes moved" in c["check"] for c in nixl["checks"])
    assert any(c["check"].startswith("disaggregated-nixl-vllm (nixl-vllm): greedy") and not c["ok"] for c in v["checks"])


def test_headline_names_the_cell_of_each_transfer_line():
    t = {"ok": 0, "transfers": 64, "bytes_total": None, "analytic_bytes_total": None}
    summary = {"cells": {"disaggregated-nixl-vllm": {"transfers": t}, "disaggregated-ray-object-store": {"transfers": {**t, "ok": 64}}}}
    lines = {h.label: h.value for h in E3.headline(summary)}
    assert lines["KV transfers (disaggregated-nixl-vllm)"].startswith("0/64 ok")
    assert lines["KV transfers (disaggregated-ray-object-store)"].startswith("64/64 ok")


def test_headline_compares_each_backend_with_aggregated_not_just_the_first():
    def m(ttft):
        return {"ttft_s": {"p50": ttft}, "tpot_s": {"p50": 0.006}, "output_token_throughput_tps": 900.0}

    summary = {
        "cells": {
            "aggregated": {"serving_mode": "aggregated", "metrics": m(0.124)},
            "disaggregated-nixl-vllm": {"serving_mode": "disaggregated", "metrics": m(0.231)},
            "disaggregated-ray-object-store": {"serving_mode": "disaggregated", "metrics": m(0.173)},
        }
    }
    lines = {h.label: h.value for h in E3.headline(summary)}
    assert lines["TTFT p50 aggregated → disaggregated-ray-object-store"] == "124 ms → 173 ms (×1.40)"
    assert lines["TTFT p50 aggregated → disaggregated-nixl-vllm"].endswith("(×1.86)")
    one = {"cells": {k: v for k, v in summary["cells"].items() if k != "disaggregated-nixl-vllm"}}
    assert "TTFT p50 aggregated → disaggregated" in {h.label for h in E3.headline(one)}
