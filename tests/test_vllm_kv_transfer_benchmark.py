"""benchmarks/vllm_kv_transfer.py needs two GPUs; here: its options and how it reads each backend's records."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import vllm_kv_transfer as bench


def test_backends_are_the_registrys_vllm_ones_given_once():
    assert bench.parse_args([]).backend == ["ray-object-store"]
    assert bench.parse_args(["--put-process"]).put_process and not bench.parse_args([]).put_process
    assert bench.parse_args(["--backend", "ray-object-store", "nixl-vllm"]).backend == ["ray-object-store", "nixl-vllm"]
    for bad in (["--backend", "carrier-pigeon"], ["--backend", "nixl-vllm", "nixl-vllm"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_each_backend_is_timed_as_it_lets_pdbench_see_it_against_both_baselines():
    store = [
        {
            "ok": True,
            "send_s": 0.1,
            "total_s": 0.1,
            "bytes": 2_000_000,
            "analytic_bytes": 2_000_000,
            "tokens": 10,
            "kv_wait_s": None,
            "ready_to_injected_s": 0.0625,
        }
    ]
    nixl = [{"ok": True, "kv_wait_s": 0.01, "bytes": None, "analytic_bytes": 2_000_000, "tokens": 10}]
    s = bench.summarise("ray-object-store", store, base_s=0.05, peer_s=0.004)
    n = bench.summarise("nixl-vllm", nixl, base_s=0.05, peer_s=0.004)
    assert s["path_s_median"] == pytest.approx(0.2) and s["ratio_pinned_over_path"] == pytest.approx(0.25) and s["bytes_measured"]
    assert n["path_s_median"] == 0.01 and n["ratio_peer_over_path"] == pytest.approx(0.4) and not n["bytes_measured"]
    assert n["bytes"] == 2_000_000 and n["stage_medians_s"] == {}
    assert s["ratio_pinned_over_ready_to_injected"] == pytest.approx(0.8) and n["ratio_pinned_over_ready_to_injected"] is None


def test_each_backend_says_what_it_gave_as_soon_as_it_is_done():
    rows = [{"ok": True, "send_s": 0.01, "total_s": 0.02}, {"ok": False, "send_s": 0.03, "total_s": 0.04}]
    assert bench.progress_line("ray-object-store", rows, 61.2) == "[61 s] ray-object-store: 1/2 transfers ok, 50.0 ms per transfer (median)"
    assert bench.progress_line("nixl-vllm", [{"ok": True, "kv_wait_s": None}], 5.0) == "[5 s] nixl-vllm: 1/1 transfers ok"
    assert bench.progress_line("nixl-vllm", "no UCX here", 1.0) == "[1 s] nixl-vllm: refused: no UCX here"


def test_rdt_is_timed_as_pdbenchs_own_transport_and_failures_leave_the_times():
    ok = {"ok": True, "send_s": 0.02, "total_s": 0.03, "bytes": 1000, "analytic_bytes": 1000, "tokens": 10}
    failed = {**ok, "ok": False, "send_s": 0.3, "total_s": 0.5, "error": "RayDirectTransportError: ..."}
    s = bench.summarise("ray-rdt-nixl", [ok, failed, ok], base_s=0.05, peer_s=None)
    assert s["path_s_median"] == pytest.approx(0.05) and len(s["per_request"]) == 2
