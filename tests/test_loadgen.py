"""The load generator on a real local Ray: open-loop schedules, closed-loop users, failures."""

import pytest
import ray

from actors.engine_actor import EngineActor
from actors.engines.spec import EngineConfig
from actors.loadgen import LoadGenerator
from analysis.metrics import SLO, cell_metrics
from analysis.records import measured, to_frame
from analysis.schemas import REQUESTS
from workloads.arrivals import ClosedLoop, Poisson
from workloads.lengths import Fixed
from workloads.requests import PackedRequests, WorkloadSpec, synthetic_requests

SIM = EngineConfig(kind="simulated").model_dump()


def _run(spec, conc):
    engine = EngineActor.options(num_cpus=0).remote(SIM)
    info = ray.get(engine.start.remote())
    reqs = synthetic_requests(spec, info["vocab_size"], seed=1)
    lg = LoadGenerator.remote()
    recs = ray.get(lg.run.remote(engine, reqs, conc))
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    return reqs, recs


def test_open_loop_sends_on_schedule_and_records_both_times(ray_local):
    spec = WorkloadSpec(num_requests=20, warmup_requests=2, output_len=Fixed(value=4), arrival=Poisson(rate=40.0))
    reqs, recs = _run(spec, 1)
    by_id = {r["request_id"]: r for r in recs}
    assert [r["warmup"] for r in recs[:2]] == [True, True]
    # The warm-up goes out all at once, whatever the cell's arrival: both sent before either ends.
    assert max(r["t_sent"] for r in recs[:2]) < min(r["t_chunks"][-1] for r in recs[:2])
    for spec_r in reqs[2:]:
        rec = by_id[spec_r.request_id]
        assert rec["t_scheduled"] == spec_r.t_scheduled
        assert rec["t_sent"] >= rec["t_scheduled"]  # never early; lateness is queue delay
        assert rec["ok"] and len(rec["output_token_ids"]) == 4
        # one entry per message: on a busy host two tokens may share one message
        assert sum(rec["chunk_tokens"]) == 4 and min(rec["chunk_tokens"]) >= 1 and rec["t_sent"] < rec["t_chunks"][0]
        assert len(rec["t_chunks"]) == len(rec["chunk_tokens"])
        assert rec["loadgen_node_id"] == ray.get_runtime_context().get_node_id()
        assert rec["server"]["engine_node_id"] == rec["loadgen_node_id"]
        assert 0 < rec["harness_hop_s"] < 1.0  # the bare actor hop, timed before the measured phase
    sent = [by_id[r.request_id]["t_sent"] for r in reqs[2:]]
    assert sent == sorted(sent)


def test_closed_loop_never_exceeds_its_users(ray_local):
    spec = WorkloadSpec(num_requests=12, warmup_requests=0, output_len=Fixed(value=6), arrival=ClosedLoop(concurrency=3))
    _, recs = _run(spec, 3)
    events = sorted([(r["t_sent"], 1) for r in recs] + [(r["t_chunks"][-1], -1) for r in recs])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    assert peak <= 3 and len(recs) == 12 and all(r["ok"] for r in recs)


def test_dead_engine_fails_requests_with_reason(ray_local):
    engine = EngineActor.options(num_cpus=0).remote(SIM)
    ray.get(engine.start.remote())
    ray.kill(engine)
    spec = WorkloadSpec(num_requests=2, warmup_requests=0)
    reqs = synthetic_requests(spec, 100, seed=0)
    recs = ray.get(LoadGenerator.remote().run.remote(engine, reqs, 1))
    assert all(not r["ok"] and "Actor" in r["error"] for r in recs)


def test_one_user_matches_the_simulated_law_once_the_harness_share_is_out(ray_local):
    """The simulated engine's exact law is the ground truth: with the harness's share (client minus
    engine, per request) taken out, TTFT, TPOT and E2E p50 must be the law within 1% (or 0.5 ms)."""
    law = {"prefill_fixed_s": 0.02, "prefill_s_per_token": 0.0001, "decode_fixed_s": 0.02, "decode_s_per_seq": 0.0}
    engine = EngineActor.options(num_cpus=0).remote(EngineConfig(kind="simulated", simulated=law).model_dump())
    info = ray.get(engine.start.remote())
    spec = WorkloadSpec(num_requests=16, warmup_requests=2, input_len=Fixed(value=100), output_len=Fixed(value=8))
    recs = ray.get(LoadGenerator.remote().run.remote(engine, synthetic_requests(spec, info["vocab_size"], seed=3), 1))
    ray.kill(engine)
    m = cell_metrics(measured(to_frame(recs, cell_id="c")), SLO())
    ttft, tpot = 0.02 + 0.0001 * 100, 0.02
    e2e = ttft + 7 * tpot
    h = m["harness"]
    print(
        f"harness share p50: TTFT {h['ttft_s']['p50'] * 1e3:.2f} ms ({h['share_of_ttft_p50']:.1%}), "
        f"TPOT {h['tpot_s']['p50'] * 1e3:.3f} ms, E2E {h['e2e_s']['p50'] * 1e3:.2f} ms; bare hop {h['hop_s'] * 1e3:.2f} ms"
    )
    assert h["hop_s"] > 0 and h["ttft_s"]["p50"] > 0
    assert h["ttft_s_net"]["p50"] == pytest.approx(ttft, abs=max(0.01 * ttft, 0.0005))
    assert h["tpot_s_net"]["p50"] == pytest.approx(tpot, abs=max(0.01 * tpot, 0.0005))
    assert h["e2e_s_net"]["p50"] == pytest.approx(e2e, abs=max(0.01 * e2e, 0.0005))


IDENTITY = {"run_id": "r", "cell_id": "c3", "serving_mode": "aggregated", "engine": "simulated"}


def test_run_cell_begins_the_engine_runs_and_reads_memory_in_one_call(ray_local):
    engine = EngineActor.options(num_cpus=0).remote(SIM)
    info = ray.get(engine.start.remote())
    spec = WorkloadSpec(num_requests=3, warmup_requests=1, output_len=Fixed(value=4), arrival=ClosedLoop(concurrency=2))
    reqs = synthetic_requests(spec, info["vocab_size"], seed=1)
    lg = LoadGenerator.remote()
    ray.get(lg.serve.remote([engine], None, None))
    for cell in ("c1", "c2"):  # the second on the engine the first warmed
        tags, identity = {"run": "r", "cell": cell, "role": "loadgen"}, {**IDENTITY, "cell_id": cell}
        got = ray.get(lg.run_cell.remote(PackedRequests.of(reqs), 2, 60.0, tags, identity))
        assert got.requests["ok"].to_pylist() == [True] * 4 and set(got.requests["cell_id"].to_pylist()) == {cell}
        assert got.requests.schema.equals(REQUESTS.arrow())  # typed here: the driver only checks and writes
        assert got.faults == [] and got.counts is None
        assert got.begin_s > 0 and got.load_s > 0 and got.after_s > 0 and got.engines_busy == 0
        assert got.memory[0] is not None and got.memory[0] == ray.get(engine.memory.remote())
    assert ray.get(engine.cell_report.remote("r", "c2"))["begin_s"] == got.begin_s  # c2 was begun once, by its first request
    ray.kill(engine)
    dead = ray.get(lg.run_cell.remote(PackedRequests.of(reqs), 1, 60.0, {"run": "r", "cell": "c3", "role": "loadgen"}, IDENTITY))
    assert not any(dead.requests["ok"].to_pylist()) and dead.memory == [None] and dead.faults[0].startswith("engine0 memory: ")


def test_a_cell_sent_while_another_runs_waits_its_turn_and_then_runs_as_alone(ray_local):
    """The pool's depth 2: the next cell's call reaches the load generator while the last one runs.
    It waits its turn (queued_s), its cell begins on the engine only then (after the other's reads,
    while the other types its records), and its records are the ones it gets alone; the gap between
    the two loads is timed on the load generator's clock."""
    engine = EngineActor.options(num_cpus=0).remote(SIM)
    info = ray.get(engine.start.remote())
    spec = WorkloadSpec(num_requests=3, warmup_requests=1, output_len=Fixed(value=4), arrival=ClosedLoop(concurrency=2))
    reqs = PackedRequests.of(synthetic_requests(spec, info["vocab_size"], seed=1))
    lg = LoadGenerator.remote()
    ray.get(lg.serve.remote([engine], None, None))

    def call(cell):
        return lg.run_cell.remote(reqs, 2, 60.0, {"run": "r", "cell": cell, "role": "loadgen"}, {**IDENTITY, "cell_id": cell})

    a, b = ray.get([call("c1"), call("c2")])  # sent together: one waits while the other runs (in either order)
    alone = ray.get(call("c3"))
    first, second = (a, b) if a.idle_before_s is None else (b, a)
    assert first.idle_before_s is None and first.queued_s == 0.0
    assert second.t_start < first.t_start + first.load_s  # it came while the other's load ran ...
    # ... and had its turn once the other's load and reads were done, while the other typed its records
    first_load_end = first.t_start + first.load_s
    assert first_load_end <= second.t_start + second.queued_s <= first_load_end + first.after_s
    assert 0 <= second.idle_before_s < first.after_s + second.queued_s
    assert alone.queued_s == 0.0 and alone.idle_before_s is not None
    assert (first.cell_on_engine, second.cell_on_engine, alone.cell_on_engine) == (1, 2, 3)  # as they ran
    for got, cell in ((a, "c1"), (b, "c2"), (alone, "c3")):
        assert got.requests["ok"].to_pylist() == [True] * 4 and set(got.requests["cell_id"].to_pylist()) == {cell}
        assert got.begin_s > 0 and got.faults == [] and got.engines_busy == 0

    def tokens(got):
        return sorted(zip(got.requests["request_id"].to_pylist(), got.requests["output_token_ids"].to_pylist(), strict=True))

    assert tokens(a) == tokens(b) == tokens(alone)  # each cell on a reset engine: the same tokens
    ray.kill(engine)


def test_after_a_request_that_timed_out_the_engine_is_asked_after_the_load_and_reports_it_busy(ray_local):
    """The report asked with the load waits for every request of the cell to leave the engine; one the
    client gave up on may never: the load generator asks again after the load, and the engine then
    still holds that request (the pool drops it rather than hand it to the next cell)."""
    slow = EngineConfig(kind="simulated", simulated={"decode_fixed_s": 0.05}).model_dump()
    engine = EngineActor.options(num_cpus=0).remote(slow)
    info = ray.get(engine.start.remote())
    spec = WorkloadSpec(num_requests=1, warmup_requests=0, output_len=Fixed(value=200), arrival=ClosedLoop(concurrency=1))
    lg = LoadGenerator.remote()
    ray.get(lg.serve.remote([engine], None, None))
    reqs, tags = synthetic_requests(spec, info["vocab_size"], seed=1), {"run": "r", "cell": "t", "role": "loadgen"}
    got = ray.get(lg.run_cell.remote(PackedRequests.of(reqs), 1, 0.5, tags, IDENTITY))
    assert got.requests["error"].to_pylist() == ["timeout after 0.5 s"] and got.faults == []
    assert got.engines_busy == 1 and got.memory[0] is not None
    ray.kill(engine)


def test_a_cell_load_reaches_the_driver_as_one_arrow_stream_unchanged():
    """run_cell's reply carries the typed records as Arrow IPC (Ray's own table reducer was ~2 ms
    a cell on the critical path): the table, its schema metadata, an engine's extra column and the
    other fields all arrive as they left."""
    import pickle

    from actors.loadgen import CellLoad
    from analysis.records import table_bytes, to_table

    raw = {
        "request_id": "r0", "warmup": False, "input_tokens": 3, "max_tokens": 2, "t_scheduled": 0.0, "t_sent": 0.01,
        "t_chunks": [0.1, 0.2], "chunk_tokens": [1, 1], "output_token_ids": [5, 6], "server_token_s": [0.05, 0.15],
        "ok": True, "error": None, "server": {"prefill_s": 0.04, "vllm_new_stat": 3},
    }  # fmt: skip
    table = to_table([raw, {**raw, "request_id": "r1"}], run_id="run", cell_id="c", serving_mode="aggregated", engine="vllm")
    load = CellLoad(table, begin_s=0.1, load_s=2.0, after_s=0.01, memory=[{"kv": 1}, None], counts=[1, 1], faults=["x"], t_start=5.0)
    wire = pickle.dumps(load)
    assert table_bytes(table) in wire
    back = pickle.loads(wire)
    assert back.requests.equals(table) and back.requests.schema.equals(table.schema, check_metadata=True)
    assert back.requests.column("vllm_new_stat").to_pylist() == [3, 3]
    assert (back.begin_s, back.load_s, back.after_s, back.memory, back.counts, back.faults, back.t_start) == (
        0.1, 2.0, 0.01, [{"kv": 1}, None], [1, 1], ["x"], 5.0
    )  # fmt: skip


def test_a_served_deployment_counts_each_cell_on_the_runs_progress_counter(ray_local):
    """The counter is given once (`serve`), when the deployment is placed; every later cell still
    adds its requests under its own id, so the progress display follows each cell of a warm engine."""
    from actors.progress import ProgressCounter

    engine = EngineActor.options(num_cpus=0).remote(SIM)
    info = ray.get(engine.start.remote())
    spec = WorkloadSpec(num_requests=3, warmup_requests=1, output_len=Fixed(value=2), arrival=ClosedLoop(concurrency=1))
    reqs = synthetic_requests(spec, info["vocab_size"], seed=2)
    counter, lg = ProgressCounter.remote(), LoadGenerator.remote()
    ray.get(lg.serve.remote([engine], None, counter))
    for cell in ("a", "b"):
        tags = {"run": "r", "cell": cell, "role": "loadgen"}
        ray.get(lg.run_cell.remote(PackedRequests.of(reqs), 1, 60.0, tags, {**IDENTITY, "cell_id": cell}))
    _, failed, per_cell = ray.get(counter.snapshot.remote())
    assert failed == 0 and per_cell == {"a": 4, "b": 4}  # every request sent, warm-up included (CellPlan.num_requests), by cell
    ray.kill(engine)
