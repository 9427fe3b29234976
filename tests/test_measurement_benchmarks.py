"""benchmarks/http_client.py and benchmarks/loadgen.py run end to end on tiny settings and report
what they promise (no timing is judged here: the benchmarks print ratios and verdicts)."""

import json
import pstats
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_every_benchmark_answers_help():
    """A benchmark that only runs on a GPU is never run here: its imports and its flags must still
    hold as the code under it moves (vllm_overhead.py once imported a name that had been renamed)."""
    code = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{path}: exit {e.code}")
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
print("FAILED " + "; ".join(failed) if failed else "ALL OK")
"""
    scripts = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert len(scripts) >= 13 and proc.stdout.strip().splitlines()[-1] == "ALL OK", proc.stdout[-3000:] + proc.stderr[-2000:]


def test_http_client_benchmark_compares_every_client():
    out = _run("http_client.py", "--streams", "2", "--requests-per-stream", "1", "--rounds", "1")
    rows = {r["client"]: r for r in out["rows"]}
    assert set(rows) == {"pdbench", "aiohttp", "httpx-sse", "raw"}
    assert all(r["requests"] == 2 and r["cpu_ms_per_request"] > 0 for r in rows.values())
    assert rows["pdbench"]["ttft_p50_ratio_to_pdbench"] == 1.0
    assert out["verdict"].startswith("goal pdbench TTFT overhead p50 < 1 ms at 2 streams: ")


@pytest.mark.slow  # starts its own Ray
def test_loadgen_benchmark_reports_send_lag_per_rate():
    out = _run("loadgen.py", "--targets", "null", "groundtruth", "--rates", "20", "40", "--seconds", "1")
    for target in ("null", "groundtruth"):
        rows = out["results"][target]
        assert [r["rate_rps"] for r in rows] == [20, 40] and all(r["failed"] == 0 for r in rows)
        assert all(0 <= r["send_lag_p50_ms"] <= r["send_lag_p99_ms"] <= r["send_lag_max_ms"] for r in rows)
        assert out["highest_rate_kept_rps"][target] in (None, 20, 40)
    assert out["goal"] == "goal null engine 1,000 req/s send lag p99 < 1 ms: not run"


@pytest.mark.slow  # starts a two-node Ray cluster of its own
def test_scale_benchmark_reports_warm_and_fresh_sweeps(tmp_path):
    out = _run(
        "scale.py", "--nodes", "2", "--cells", "6", "--fresh-cells", "2", "--idle-s", "3", "--profile", str(tmp_path / "driver.pstats")
    )
    assert out["evidence"] == "simulated" and (out["nodes"], out["cells"]) == (2, 6)
    warm, fresh = out["runs"]
    assert (warm["engines"], warm["cells_ok"], fresh["engines"], fresh["cells_ok"]) == ("warm", 6, "fresh", 2)
    # One deployment per concurrent cell at most, and every cell after the first per slot warm.
    assert 1 <= warm["engine_starts"] <= 2 and warm["cells_on_warm_engines"] == 6 - warm["engine_starts"]
    assert fresh["engine_starts"] == 2 and fresh["cells_on_warm_engines"] == 0
    assert warm["nodes_used"] >= 1 and sum(warm["cells_per_node"].values()) == 6
    assert 0 < warm["loop_busy_fraction"] < 1 and warm["driver_cpu_fraction"] > 0
    assert warm["loop_busy_s"] <= warm["loop_s"] <= warm["wall_s"]
    assert warm["fixed_warm_s"]["p50"] <= warm["fixed_warm_s"]["max"] and fresh["fixed_warm_s"] is None
    assert out["fixed_cost_warm_over_fresh_p50"] > 0
    # The warm fixed cost by stage (setup, reads after the load, the call and its reply, the driver's own): each a share of it.
    stages = warm["fixed_warm_stages_p50_s"]
    assert set(stages) == {"setup", "after", "call", "reply", "queued", "driver", "gap"} and all(v >= 0 for v in stages.values())
    # Warm engines hold the next cell's call behind the running one (depth 2); fresh engines never do.
    assert warm["cells_queued"] >= 1 and fresh["cells_queued"] == 0
    assert fresh["fixed_warm_stages_p50_s"] is None
    # Where the driver's CPU went: per cell, by thread, and a profile of the warm run's main thread.
    assert warm["driver_cpu_per_cell_ms"] > 0 and warm["driver_cpu_by_thread_s"]["main"] > 0
    assert warm["driver_overhead_fraction"] == pytest.approx(warm["driver_cpu_s"] / warm["wall_s"])
    phases = warm["main_cpu_by_phase_s"]
    assert set(phases) == {"setup", "loop", "finalize"} and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(warm["driver_cpu_by_thread_s"]["main"], abs=0.1)
    assert sum(warm["driver_cpu_by_thread_s"].values()) == pytest.approx(warm["driver_cpu_s"], abs=0.1)
    stats = pstats.Stats(str(tmp_path / "driver.pstats"))
    assert any(fn == "run_cell" for _file, _line, fn in stats.stats)  # type: ignore[attr-defined]
    # The box's CPU by role over the warm run: the run's own actors, Ray's processes, the driver.
    roles = warm["box_cpu_by_role_s"]
    assert {"driver", "pdbench: EngineActor", "pdbench: LoadGenerator", "ray: raylets"} <= set(roles)
    assert roles["pdbench: LoadGenerator"] > 0 and 0 < warm["box_cpu_share_of_cores"] <= 1.05
    # The idle floor: Ray's daemons with nothing placed, one idle actor per probed node (a few clock
    # ticks over 3 s, so possibly none), and per run the share those make with the run's own actor processes.
    floor = out["idle_floor"]
    assert floor["actors_probed"] == 2 and floor["daemons_cores"] > 0 and floor["actor_core_share"] >= 0
    assert "ray: raylets" in floor["daemons_by_role_s"] and "driver" not in floor["daemons_by_role_s"]
    # an engine, a load generator and a telemetry sampler at least, each a process of its own
    assert warm["actor_processes"] >= 3 and 0 < warm["idle_floor_share_of_cores"] < 1


@pytest.mark.slow  # starts its own Ray and Serve
def test_serve_overhead_benchmark_reports_every_layer_and_hop():
    out = _run("serve_overhead.py", "--requests", "2", "--warmup", "1", "--prompt-tokens", "64", "--output-tokens", "2")
    rows = {r["layer"]: r for r in out["rows"]}
    assert set(rows) == {"http-plain", "actor", "handle", "http-serve", "http-direct", "http-serve-thread"}
    assert all(r["requests"] == 2 and 0 < r["ttft_p50_ms"] <= r["ttft_p90_ms"] for r in rows.values())
    assert out["hops_ms"]["ray actor hop (actor)"] == rows["actor"]["overhead_p50_ms"]
    assert out["serve_overhead_ratio_to_default_thread"] > 0
    assert out["in_process_ms"]["tokenize_ms"] > 0 and out["evidence"].startswith("simulated")


def test_put_gil_benchmark_measures_the_loop_beside_each_copy(tmp_path):
    out_file = tmp_path / "pg.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "put_gil.py"), "--mib", "4", "--seconds", "0.3", "--json", str(out_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    assert set(out) >= {"alone", "ray_put", "putter", "ray_put_other_process", "np_copyto"} and out["mib"] == 4
    assert out["ray_put"]["ops"] > 0 and out["putter"]["ops"] > 0 and out["np_copyto"]["ops"] > 0  # the copies ran beside the loop
    assert all(0 <= out[k]["held_share"] <= 1 and out[k]["longest_gap_ms"] > 0 for k in ("alone", "ray_put", "putter", "np_copyto"))
    assert "longest gap beside ray.put / in another process beside it" in proc.stdout
    assert "longest gap beside ray.put / beside puts through the putter" in proc.stdout


def test_scale_benchmark_tells_each_process_role_from_its_title():
    from benchmarks import scale

    def role(cmd: str, pid: int = 7) -> str:
        return scale.role_of(cmd, driver_pid=1, pid=pid)

    assert role("anything", pid=1) == "driver"
    # By title alone, a worker is named by what it runs (the run's actors are named by the actor table instead).
    assert role("ray::pdbench:e1-20261129-x:in36-out4:engine:EngineActor.__init__") == "ray worker: EngineActor"
    assert role("ray::hardware") == "ray worker: hardware" and role("ray::TelemetrySampler") == "ray worker: TelemetrySampler"
    assert role("ray::IDLE") == role("/x/python /x/ray/_private/workers/default_worker.py --a") == "ray: workers without an actor"
    assert role("/x/ray/core/src/ray/raylet/raylet --node") == "ray: raylets" and role("ray::DashboardAgent") == "ray: dashboard agents"
    assert role("/usr/bin/bash") == "other processes"
