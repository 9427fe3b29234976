"""The driver's fan-out: a failing cell does not stop the sweep; --resume after a real kill loses
and duplicates nothing; adaptive rounds (E2's rate search) on a simulated engine with a known law."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from actors.engine_actor import actor_name
from cluster.cli import app
from cluster.config import resolve
from cluster.driver import Driver, RunOptions
from cluster.planning import cell_concurrency
from workloads.arrivals import ClosedLoop
from workloads.requests import RequestSpec
from workloads.text import workload_of
from workloads.tracks.base import CellPlan, Track, TrackParams, register


@register
class _Faulty(Track):
    """Four cells: two good, one whose prompts do not fit the model (an exception inside the cell),
    one whose engine actor the test kills mid-run (actor death)."""

    name = "ztest-faulty"
    question = "test only: does a failing cell stop the sweep?"
    params_model = TrackParams

    def cells(self, workload, params):
        bad = (RequestSpec("r00000", (1, 2, 10**6), 4),)
        slow = workload.model_copy(update={"num_requests": 60, "arrival": ClosedLoop(concurrency=1)})
        return [
            CellPlan("good0", "aggregated", workload),
            CellPlan("vocab", "aggregated", workload_of(bad, workload.arrival), requests=bad),
            CellPlan("killed", "aggregated", slow),
            CellPlan("good1", "aggregated", workload),
        ]


def _kill_engine_when_up(run_id: str, cell: str, stop: threading.Event) -> None:
    import ray

    while not stop.is_set():
        try:
            actor = ray.get_actor(actor_name(run_id, cell, "engine"), namespace="pdbench")
        except ValueError:
            time.sleep(0.05)
            continue
        time.sleep(1.0)  # let it start and serve a little first
        ray.kill(actor, no_restart=True)
        return


def test_failing_cells_do_not_stop_the_sweep(ray_local, tmp_path):
    cfg = resolve("ztest-faulty", {"engine": {"kind": "simulated"}, "workload": {"num_requests": 6, "warmup_requests": 1}})
    driver = Driver(cfg, RunOptions(out_dir=tmp_path))
    stop = threading.Event()
    killer = threading.Thread(target=_kill_engine_when_up, args=(driver.run_id, "killed", stop), daemon=True)
    killer.start()
    try:
        run_dir = driver.run()
    finally:
        stop.set()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "partial"
    cells = m["cells"]
    assert cells["good0"]["status"] == cells["good1"]["status"] == "ok"
    assert cells["vocab"]["status"] == "failed" and "outside the model's vocabulary" in cells["vocab"]["error"]
    # Killed after its first requests: the rows measured before stay (partial), the death is named.
    assert cells["killed"]["status"] in ("partial", "failed") and "Actor" in cells["killed"]["error"], cells["killed"]["error"]
    df = pd.read_parquet(run_dir / "requests.parquet")
    good = df[df["cell_id"] != "killed"]
    assert set(good["cell_id"]) == {"good0", "good1"} and len(good) == 2 * 7
    md = (run_dir / "report.md").read_text()
    assert "## Failed cells" in md and "outside the model's vocabulary" in md


def _session(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getsid(int(d)) == sid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def test_resume_after_sigkill_loses_and_duplicates_nothing(ray_local, tmp_path):
    cfg_file = tmp_path / "e1.yaml"
    cfg_file.write_text(
        "track: e1\nworkload: {num_requests: 12, warmup_requests: 1}\nparams: {input_lens: [8, 16, 24], output_lens: [4, 8]}\n"
    )
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "run", "e1", "--simulate", "--no-progress", "-c", str(cfg_file), "-o", str(out)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*/cells/*/cell.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run died or never finished a cell"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill, mid-run: no handler, no cleanup
        proc.wait()
    finally:
        time.sleep(2)  # Ray's own processes of that run exit by themselves; end what is left of ours
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    run_dir = next(out.iterdir())
    before = {p.parent.name: p.read_text() for p in run_dir.glob("cells/*/cell.json")}
    assert 1 <= len(before) < 6, "killed in the middle"
    assert not (run_dir / "summary.json").exists()

    res = CliRunner().invoke(app, ["run", "e1", "--simulate", "--no-progress", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["resumed_at"]) == 1 and len(m["cells"]) == 6
    for cell, text in before.items():  # finished cells were kept, not run again
        assert (run_dir / "cells" / cell / "cell.json").read_text() == text
    df = pd.read_parquet(run_dir / "requests.parquet")
    assert len(df) == 6 * 13 and not df.duplicated(["cell_id", "request_id"]).any()
    assert df.groupby("cell_id").size().eq(13).all()
    assert not list(run_dir.rglob("*.tmp"))

    # Resuming a complete run reruns nothing and rebuilds the same records.
    res = CliRunner().invoke(app, ["run", "e1", "--simulate", "--no-progress", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    again = pd.read_parquet(run_dir / "requests.parquet")
    assert len(again) == len(df) and set(again["cell_id"]) == set(df["cell_id"])

    # Another config is refused, naming both hashes.
    res = CliRunner().invoke(app, ["run", "e1", "--simulate", "--seed", "9", "--resume", str(run_dir)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--resume" in res.output and "config hash" in res.output


def test_an_error_mid_run_still_writes_every_finished_cells_files(ray_local, tmp_path, monkeypatch):
    """The cells' files are written by a thread behind the loop: a run that ends by an error (here
    Ctrl-C after the second cell) writes what is queued first, and a resume reruns only the rest."""
    import cluster.cell_record as cr

    real_write = cr.write_rows

    def slow_write(path, df, schema):  # the writer lags behind the loop: cells are queued when the run ends
        time.sleep(0.5)
        return real_write(path, df, schema)

    monkeypatch.setattr(cr, "write_rows", slow_write)
    real_ran, ran = Driver._ran, []

    def interrupt_after_two(self, metas):
        real_ran(self, metas)
        ran.append(len(metas))
        if len(metas) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Driver, "_ran", interrupt_after_two)
    over = {"workload": {"num_requests": 2, "warmup_requests": 1}, "params": {"input_lens": [8, 16, 24, 32], "output_lens": [4]}}
    cfg = resolve("e1", {**over, "max_concurrent_cells": 1})
    d = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False))
    with pytest.raises(KeyboardInterrupt):
        d.run()
    done = {p.parent.name: p.read_text() for p in d.run_dir.glob("cells/*/cell.json")}
    assert len(done) == 2 and all(json.loads(t)["status"] == "ok" for t in done.values())
    assert all((d.run_dir / "cells" / c / "requests.arrow").is_file() for c in done)

    monkeypatch.setattr(Driver, "_ran", real_ran)
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False, resume=d.run_dir)).run()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["cells"]) == 4
    assert {c: (run_dir / "cells" / c / "cell.json").read_text() for c in done} == done  # kept, not run again


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = CliRunner().invoke(app, ["run", "e1", "--simulate", "--resume", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "not a pdbench run folder" in res.output


def test_auto_concurrency(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    cfg = resolve("e1")
    assert cfg.max_concurrent_cells == "auto"
    assert cell_concurrency(cfg, [[{"CPU": 1.0, "GPU": 1.0}]] * 3) == 8
    assert cell_concurrency(cfg, [[{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]]) == 4  # disaggregated: 2 GPUs a cell
    assert cell_concurrency(cfg, [[{"CPU": 1.0}]]) == 1, "CPU-only cells would measure each other's load"
    assert cell_concurrency(cfg, [[{"CPU": 2.0}]], measures_latency=False) == 32, "accuracy and memory tracks fill the CPUs"
    assert cell_concurrency(resolve("e1", {"max_concurrent_cells": 3}), [[{"CPU": 1.0}]]) == 3


def _true_max_rate(prefill: float, decode: float, out_tokens: int, ttft_slo: float, n: int, attainment: float) -> float:
    """D/D/1 with batch size 1: service S = prefill + (out − 1) × decode. Above 1/S the k-th request
    (from 0) waits k(S − g) for gap g; it meets the TTFT SLO when k(S − g) + prefill ≤ SLO. The
    attainment target needs the first ⌈attainment × n⌉ requests inside: k = ⌈a·n⌉ − 1 must pass."""
    import math

    s = prefill + (out_tokens - 1) * decode
    k = math.ceil(attainment * n) - 1
    return 1.0 / (s - (ttft_slo - prefill) / k)


def test_rate_search_finds_the_known_max_rate_within_one_step(ray_local, tmp_path):
    # Time scale large against host stalls (this box is shared): S = 0.4 s, capacity 2.5 req/s.
    law = {"prefill_fixed_s": 0.04, "prefill_s_per_token": 0.0, "decode_fixed_s": 0.04, "decode_s_per_seq": 0.0}
    n, out, slo_ttft, target, step = 20, 10, 0.3638, 0.9, 0.25
    truth = _true_max_rate(0.04, 0.04, out, slo_ttft, n, target)
    assert truth == pytest.approx(2.625, abs=1e-3)
    cfg = resolve(
        "e2",
        {
            "engine": {"kind": "simulated", "max_batch_size": 1, "simulated": law},
            "workload": {
                "num_requests": n,
                "warmup_requests": 1,
                "input_len": {"kind": "fixed", "value": 8},
                "output_len": {"kind": "fixed", "value": out},
            },
            "slo": {"ttft_s": slo_ttft, "tpot_s": None, "attainment": target},
            "params": {
                "concurrencies": [],
                "rates": [],
                # Near-periodic arrivals (gamma shape 10^4: gaps within 1%), so the law's answer is exact.
                "search": {"low": 1.5, "high": 4.0, "resolution": step, "burstiness": 10000, "max_probes": 8},
            },
        },
    )
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path)).run()
    s = json.loads((run_dir / "summary.json").read_text())
    g = s["verdicts"]["max_rate_goodput"]
    assert g["status"] == "bracketed" and g["bracket_width_rps"] <= step, g
    assert abs(g["rate_rps"] - truth) <= step, (g, truth)
    m = json.loads((run_dir / "manifest.json").read_text())
    probes = sorted(float(c.split("-r")[1]) for c in m["cells"])
    assert probes[0] == 1.5 and probes[-1] == 4.0 and len(probes) <= 8
    assert "Max-rate goodput" in (run_dir / "report.md").read_text()


def test_help_explains_resume_and_compare():
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())  # click's test runner wraps help at 80 columns
    assert res.exit_code == 0 and "--resume" in text and "config hash" in text
    res = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--allow-simulated" in res.output and "baseline" in res.output
