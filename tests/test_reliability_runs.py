"""Fault injection, runs: a run where nothing succeeded is not a success; a fault after requests
ran keeps what was measured; damaged or concurrent resumes; every wait bounded and named."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest
from faults import closed_port, http_server
from typer.testing import CliRunner

from analysis.packet import load_packet, read_rows
from analysis.schemas import read_requests
from cluster.cell_record import no_success
from cluster.cli import app
from cluster.config import resolve
from cluster.driver import Driver, RunOptions
from workloads.arrivals import ClosedLoop
from workloads.tracks.base import CellPlan, Track, TrackParams, register

KEY = "s3cr3t-echoed-back-0123456789"
SMALL = {"workload": {"num_requests": 3, "warmup_requests": 1, "output_len": {"kind": "fixed", "value": 4}}}
COLS = {"COLUMNS": "200"}


def _target(url: str, **extra) -> dict:
    return {"target": {"base_url": url, "model": "m", "vocab_size": 100, **extra}}


def _files_text(run_dir) -> str:
    out = []
    for p in run_dir.rglob("*"):
        if p.is_file():
            out.append(pd.read_parquet(p).astype(str).to_string() if p.suffix == ".parquet" else p.read_text(errors="replace"))
    return "\n".join(out)


# --- 3. every request failed ------------------------------------------------------------------
def test_a_target_answering_401_to_everything_fails_the_run_and_leaks_no_key(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_AUTH", KEY)  # a name that says nothing: target.api_key_env makes it secret
    with http_server("401-echo") as url:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({**SMALL, **_target(url, api_key_env="BENCH_AUTH"), "params": {"rounds": 1}}))
        res = CliRunner().invoke(app, ["run", "e0", "-c", str(cfg), "-o", str(tmp_path / "runs"), "--no-progress"], env=COLS)
    assert res.exit_code == 1, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert all(c["status"] == "failed" and "no request succeeded" in c["error"] and "401" in c["error"] for c in m["cells"].values())
    cell = next((run_dir / "cells").iterdir())
    rows = read_rows(cell / "requests.arrow", read_requests)  # the failed requests stay as evidence
    assert len(rows) == 4 and not rows["ok"].any() and rows["error"].str.contains("invalid api key").all()
    assert KEY not in _files_text(run_dir)
    assert CliRunner().invoke(app, ["report", str(run_dir)], env=COLS).exit_code == 0


@pytest.mark.parametrize(
    "track,params",
    [
        ("e0", {}),
        ("e1", {"input_lens": [8, 16], "output_lens": [4]}),
        ("e2", {"concurrencies": [1, 2], "rate_fractions": [0.5], "burstiness": [1.0]}),
    ],
    ids=["e0", "e1", "e2"],
)
def test_an_unreachable_target_fails_the_run_and_reports_still_build(ray_local, tmp_path, track, params):
    cfg = resolve(track, {**SMALL, **_target(f"http://127.0.0.1:{closed_port()}"), "params": params})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    packet = load_packet(run_dir)
    assert packet.manifest["status"] == "failed" and packet.requests.empty
    assert "Connect" in next(iter(packet.manifest["cells"].values()))["error"]  # httpx ConnectError or ConnectionRefusedError
    assert "No measurements" in (run_dir / "report.md").read_text()
    assert CliRunner().invoke(app, ["report", str(run_dir)], env=COLS).exit_code == 0


def test_no_success_names_the_first_error_and_ignores_warmup():
    def rows(**cols):
        base = {"warmup": [True, False, False], "ok": [True, False, False], "error": [None, "HTTP 500: boom\nmore", "x"]}
        return pa.table({**base, **cols})

    assert no_success(rows()) == "no request succeeded (2 of 2 failed); first error: HTTP 500: boom"
    assert no_success(rows(ok=[False, True, False])) is None
    assert no_success(rows(error=[None, None, "x"])) == "no request succeeded (2 of 2 failed); first error: x"
    assert no_success(rows(error=["warm-up's own", None, None])) == "no request succeeded (2 of 2 failed)"
    assert no_success(rows(warmup=[True] * 3)) == no_success(rows().slice(0, 0)) == "no request was measured"


def test_node_ids_of_a_cell_by_role_without_missing_ones():
    from cluster.cell_record import cell_node_ids

    rows = pa.table({"engine_node_id": ["b", None, "a", "b"], "loadgen_node_id": pa.nulls(4, pa.string()), "ok": [True] * 4})
    assert cell_node_ids({}, rows) == {"engine": ["a", "b"]}  # no row names a load generator's node
    assert cell_node_ids({"engine_info": {"node": {"node_id": "n"}}}, rows.drop_columns("engine_node_id")) == {"engine": ["n"]}
    assert cell_node_ids({}, rows.slice(0, 0)) == {}


# --- 4. a fault after requests ran keeps what was measured -----------------------------------
@register
class _OnePair(Track):
    """One disaggregated cell long enough to kill a part of it in the middle."""

    name = "ztest-onepair"
    question = "test only: does a fault mid-cell keep the records?"
    params_model = TrackParams

    def cells(self, workload, params):
        return [CellPlan("pair", "disaggregated", workload.model_copy(update={"arrival": ClosedLoop(concurrency=1)}))]


@pytest.mark.parametrize("victim", ["prefill", "kvdir", "decode"])
def test_a_part_dying_mid_cell_keeps_rows_and_transfers_with_the_fault_named(ray_local, tmp_path, victim):
    import ray

    from actors.engine_actor import actor_name

    cfg = resolve(
        "ztest-onepair",
        {
            "workload": {
                "num_requests": 40,
                "warmup_requests": 0,
                "input_len": {"kind": "fixed", "value": 16},
                "output_len": {"kind": "fixed", "value": 2},
            },
            "kv_transfer": {"ref_timeout_s": 0.5, "fetch_timeout_s": 0.5},
        },
    )
    driver = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False))
    killed = []

    def kill_when_some_done(p) -> None:
        if p.requests_done >= 5 and not killed:
            ray.kill(ray.get_actor(actor_name(driver.run_id, "pair", victim), namespace="pdbench"), no_restart=True)
            killed.append(p.requests_done)

    run_dir = driver.run(kill_when_some_done)
    assert killed
    m = json.loads((run_dir / "manifest.json").read_text())
    cell = m["cells"]["pair"]
    assert cell["status"] == "partial" and m["status"] == "partial", cell
    named = {"prefill": "prefill shutdown", "kvdir": "KV directory stats", "decode": "decode transfers"}[victim]
    assert "records kept" in cell["error"] and named in cell["error"] and "\n" not in cell["error"]
    df = pd.read_parquet(run_dir / "requests.parquet")
    assert len(df) == 40 and df["ok"].sum() >= 5
    transfers = pd.read_parquet(run_dir / "transfers.parquet")
    if victim == "decode":  # the records it held died with it; the fault says so
        assert transfers.empty
    else:
        assert transfers["ok"].sum() >= 5


def test_an_engine_killed_mid_cell_keeps_its_rows(ray_local, tmp_path):
    """Aggregated: the engine dies after some requests; the cell's rows are kept, the fault named.
    E0's two cells share one warm deployment, the second queued behind the first (the pool's depth 2),
    in whichever order Ray runs their calls: the cell queued behind the dead engine moves to a fresh one."""
    import ray

    from actors.engine_actor import actor_name

    cfg = resolve(
        "e0",
        {
            "engine": {"kind": "simulated", "simulated": {"decode_fixed_s": 0.02}},
            "params": {"rounds": 1},
            "workload": {
                "num_requests": 40,
                "warmup_requests": 0,
                "output_len": {"kind": "fixed", "value": 2},
                "arrival": {"kind": "closed", "concurrency": 1},
            },
        },
    )
    driver = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False))
    killed: list[str] = []

    def kill_when_some_done(p) -> None:
        running = [c.cell_id for c in p.cells if c.state == "running" and c.requests_done >= 5]
        if running and not killed:
            maker = driver.plans[0].cell_id  # the deployment's actors are named for the cell that started it
            ray.kill(ray.get_actor(actor_name(driver.run_id, maker, "engine"), namespace="pdbench"), no_restart=True)
            killed.append(running[0])

    run_dir = driver.run(kill_when_some_done)
    m = json.loads((run_dir / "manifest.json").read_text())
    (victim,) = killed
    (other,) = {p.cell_id for p in driver.plans} - {victim}
    cell = m["cells"][victim]
    assert cell["status"] == "partial" and "engine0 memory" in cell["error"], cell
    df = pd.read_parquet(run_dir / "requests.parquet")
    rows = df[df["cell_id"] == victim]
    assert len(rows) == 40 and 5 <= rows["ok"].sum() < 40
    # The actor-death texts are one line in the table; the whole of them is in errors.log.
    errors = rows["error"].dropna()
    assert not errors.empty and not errors.str.contains("\n").any()
    assert m["cells"][victim]["log"] == f"cells/{victim}/errors.log" and (run_dir / "errors.log").is_file()
    # The other cell ran whole on a live engine: before the kill, or after it on a new one.
    assert m["cells"][other]["status"] == "ok" and m["cells"][other]["engine"] == "fresh", m["cells"][other]
    assert df[df["cell_id"] == other]["ok"].all() and len(df[df["cell_id"] == other]) == 40


# --- 5. concurrent and damaged resumes ---------------------------------------------------------
E1 = {"workload": {"num_requests": 3, "warmup_requests": 0}, "params": {"input_lens": [8, 16], "output_lens": [4]}}


@pytest.fixture
def finished_e1(ray_local, tmp_path):
    cfg = resolve("e1", {**E1, "engine": {"kind": "simulated"}})
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path / "runs", progress=False)).run()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    return run_dir


def _resume(run_dir, *extra):
    return CliRunner().invoke(app, ["run", "e1", "--simulate", "--no-progress", "--resume", str(run_dir), *extra], env=COLS)


def test_a_second_resume_while_one_runs_is_refused_in_one_line(finished_e1):
    from filelock import FileLock

    from cluster.resume import LOCK_FILE

    before = (finished_e1 / "manifest.json").read_text()
    with FileLock(finished_e1 / LOCK_FILE):  # another pdbench process holds the run
        res = _resume(finished_e1)
    assert res.exit_code == 2 and "being run by another pdbench process" in res.output and "Traceback" not in res.output
    assert (finished_e1 / "manifest.json").read_text() == before
    assert _resume(finished_e1).exit_code == 0  # the lock went with its holder


def test_resume_removes_what_a_killed_write_left_behind(finished_e1):
    """A SIGKILL during an atomic write leaves its temporary file; the resume that holds the lock clears it."""
    left = [finished_e1 / ".manifest.json.dead1234.tmp", next((finished_e1 / "cells").iterdir()) / ".cell.json.dead5678.tmp"]
    for p in left:
        p.write_text("partial")
    assert _resume(finished_e1).exit_code == 0
    assert not list(finished_e1.rglob("*.tmp"))


def test_a_resume_while_another_process_holds_the_run_is_refused(finished_e1):
    """The same refusal when the holder is another process (what two `--resume`s at once are)."""
    import subprocess
    import sys

    from cluster.resume import LOCK_FILE

    hold = (
        "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(finished_e1 / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = _resume(finished_e1)
        assert res.exit_code == 2 and "being run by another pdbench process" in res.output, res.output
    finally:
        holder.kill()
        holder.wait()
    assert _resume(finished_e1).exit_code == 0  # the lock died with its holder


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_cell_record_file_is_run_again_on_resume(finished_e1, damage):
    cells = sorted((finished_e1 / "cells").iterdir())
    victim, kept = cells[0], cells[1]
    data = (victim / "requests.arrow").read_bytes()
    (victim / "requests.arrow").write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not arrow" * 10, "empty": b""}[damage])
    kept_meta = (kept / "cell.json").read_text()
    res = _resume(finished_e1)
    assert res.exit_code == 0, res.output
    m = json.loads((finished_e1 / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["resumed_at"]) == 1
    assert (kept / "cell.json").read_text() == kept_meta  # the sound cell was not run again
    df = pd.read_parquet(finished_e1 / "requests.parquet")
    assert len(df) == 2 * 3 and not df.duplicated(["cell_id", "request_id"]).any()


def test_a_resume_with_nothing_to_redo_never_marks_a_complete_run_running(finished_e1, monkeypatch):
    import cluster.driver as drv

    written = []
    real = drv.write_json

    def spy(path, obj):
        if path.name == "manifest.json":
            written.append(obj["status"])
        real(path, obj)

    monkeypatch.setattr(drv, "write_json", spy)
    assert _resume(finished_e1).exit_code == 0
    assert written == ["complete"]


def test_a_corrupt_top_level_file_is_rebuilt_on_resume(finished_e1):
    (finished_e1 / "telemetry.parquet").write_bytes(b"PAR1 broken")
    (finished_e1 / "requests.parquet").write_bytes(b"")
    (finished_e1 / "summary.json").write_text('{"cells": {')
    assert _resume(finished_e1).exit_code == 0
    assert len(load_packet(finished_e1).requests) == 2 * 3


# --- 6. every wait bounded and named -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["poisson", "gamma"])
def test_an_absurdly_low_open_loop_rate_is_refused_at_validation(kind):
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match=r"workload\.arrival\.rate: 48 requests at 1e-06 req/s .* h"):
        resolve("e0", {"workload": {"arrival": {"kind": kind, "rate": 1e-6}}})


def test_a_track_rate_too_low_to_schedule_is_refused_before_any_engine_starts(tmp_path):
    from cluster.config import ConfigError

    cfg = resolve("e2", {"engine": {"kind": "simulated"}, "params": {"rates": [1e-4], "concurrencies": [1]}})
    with pytest.raises(ConfigError, match=r"params rates\): cell poisson-r0\.0001: .* more than the 6 h"):
        Driver(cfg, RunOptions(out_dir=tmp_path)).run()
    assert not any(tmp_path.iterdir())


def test_a_target_that_never_replies_is_bounded_with_request_timeout_null(ray_local, tmp_path):
    import time

    with http_server("silent") as url:
        cfg = resolve("e0", {**SMALL, "request_timeout_s": None, **_target(url, read_timeout_s=0.5), "params": {"repeats": 2}})
        t0 = time.monotonic()
        run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
        took = time.monotonic() - t0
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed" and took < 60
    assert all("target.read_timeout_s" in c["error"] for c in m["cells"].values()), m["cells"]


def test_the_http_backend_names_a_silent_server():
    import asyncio

    from actors.openai_client import OpenAIBackend
    from actors.target import TargetSpec

    async def one(url: str) -> list[dict]:
        backend = OpenAIBackend(TargetSpec(base_url=url, model="m", vocab_size=10, read_timeout_s=0.3))
        try:
            return [d async for d in backend.stream({"prompt_token_ids": [1], "max_tokens": 1})]
        finally:
            await backend.aclose()

    with http_server("silent") as url:
        deltas = asyncio.run(asyncio.wait_for(one(url), 20))
    assert deltas[-1]["finished"] and deltas[-1]["error"] == f"no reply from {url} for 0.3 s (target.read_timeout_s)"


def test_a_cell_whose_resources_are_held_gives_up_naming_them(ray_local, tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": 3.0}])  # another job holds 3 of the 4 CPUs
    ray_local.get(holder.ready(), timeout=60)
    try:
        cfg = resolve("e0", {**SMALL, "engine": {"kind": "simulated"}, "placement": {"cpus_per_engine": 3, "wait_timeout_s": 1}})
        run_dir = Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    finally:
        remove_placement_group(holder)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "failed"
    for c in m["cells"].values():
        assert c["error"].startswith("RuntimeError: placement.wait_timeout_s: the cell waited 1 s for [{'CPU': 3.0}]"), c


def test_cells_are_checked_against_the_cluster_read_once_and_one_that_never_fits_is_refused(ray_local, tmp_path, monkeypatch):
    import cluster.driver as drv
    from cluster.config import ConfigError

    reads = []
    real = drv.ray.cluster_resources
    monkeypatch.setattr(drv.ray, "cluster_resources", lambda: reads.append(1) or real())
    cfg = resolve("e1", {"engine": {"kind": "simulated"}, "params": {"input_lens": [8, 9, 10], "output_lens": [4]}})
    assert len(Driver(cfg, RunOptions(out_dir=tmp_path, progress=False))._bundles()) == 3 and len(reads) == 1  # three cells, one read
    cfg = resolve("e1", {"engine": {"kind": "simulated"}, "placement": {"cpus_per_engine": 64}})
    with pytest.raises(
        ConfigError, match=r"placement.gpus_per_engine/cpus_per_engine: placement: a cell needs 64 CPU but the cluster has 4"
    ):
        Driver(cfg, RunOptions(out_dir=tmp_path, progress=False)).run()
    assert not list(tmp_path.iterdir())  # refused before its folder is made


def test_how_long_to_wait_is_not_part_of_the_config_hash():
    from cluster.config import config_hash
    from cluster.planning import cell_hash, plan_cells

    a, b = resolve("e0"), resolve("e0", {"placement": {"wait_timeout_s": 5}})
    assert config_hash(a) == config_hash(b)
    assert [cell_hash(a, p) for p in plan_cells(a)] == [cell_hash(b, p) for p in plan_cells(b)]
