"""Warm engines across cells (cluster/cells/engine_pool.py): one engine start per engine configuration,
the same records as fresh engines, and a failed cell's engine never serves the next cell."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from cluster.cells.engine_pool import QUEUE_DEPTH, EnginePool, EngineUse, engine_use_record, grouped, pool_depth
from cluster.config import config_hash, resolve
from cluster.driver import Driver, RunOptions
from workloads.tracks.base import CellPlan

# Three cells of one engine configuration (E1's grid varies the workload only).
E1_THREE = {"workload": {"num_requests": 2, "warmup_requests": 1}, "params": {"input_lens": [16, 24, 32], "output_lens": [4]}}


def run(tmp_path_factory, overrides):
    d = Driver(resolve("e1", overrides), RunOptions(out_dir=tmp_path_factory.mktemp("pool"), progress=False)).run()
    return d, json.loads((d / "manifest.json").read_text())


def tokens(run_dir) -> dict[tuple[str, str], list[int]]:
    df = pd.read_parquet(run_dir / "requests.parquet")
    return {(r.cell_id, r.request_id): list(r.output_token_ids) for r in df.itertuples()}


@pytest.fixture(scope="module")
def pooled(ray_local, tmp_path_factory):
    return run(tmp_path_factory, E1_THREE)


@pytest.fixture(scope="module")
def fresh(ray_local, tmp_path_factory):
    return run(tmp_path_factory, {**E1_THREE, "fresh_engines": True})


def test_one_engine_config_starts_one_engine(pooled):
    d, m = pooled
    assert m["status"] == "complete"
    pool = m["engine_pool"]
    assert pool == {**pool, "reuse": True, "pooled_modes": ["aggregated"], "depth": 2, "engine_starts": 1, "cells_on_warm_engines": 2}
    # With depth 2 the next cell's call waits behind the running one; it need not have come in time.
    assert 0 <= pool["cells_queued"] <= 2
    cells = m["cells"]
    # The first two share the new deployment, in whichever order Ray runs their calls; the third waited for one.
    assert sorted(cells[c]["engine"] for c in ("in16-out4", "in24-out4")) == ["fresh", "reused"]
    assert cells["in32-out4"]["engine"] == "reused"
    assert all(c["wall_s"] > 0 for c in cells.values())
    cell = json.loads((d / "cells" / "in32-out4" / "cell.json").read_text())
    use = cell["engine_use"]
    assert use["cell_on_engine"] == 3 and use["engine_starts"] == 0 and use["load_s"] > 0
    # The fixed cost's stages are parts of the cell's wall time, the driver's own work the rest.
    stages = [use[k] for k in ("setup_s", "after_s", "call_s", "reply_s")]
    assert all(v >= 0 for v in stages) and use["after_s"] > 0 and sum(stages) + use["load_s"] <= cell["wall_s"]
    # The manifest keeps the engines' times, for packets that travel without cells/.
    fresh_cell = next(c for c in cells.values() if c["engine"] == "fresh")
    assert "gap_s" not in fresh_cell and fresh_cell["setup_s"] > 0 and fresh_cell["load_s"] > 0
    assert cells["in32-out4"]["load_s"] == round(use["load_s"], 3) and cells["in32-out4"]["gap_s"] == round(use["gap_s"], 3) >= 0


def test_fresh_engines_flag_starts_one_per_cell_with_the_same_records(pooled, fresh):
    (pd_, pm), (fd, fm) = pooled, fresh
    assert fm["engine_pool"]["engine_starts"] == 3 and fm["engine_pool"]["cells_on_warm_engines"] == 0
    assert {c["engine"] for c in fm["cells"].values()} == {"fresh"}
    assert pm["config_hash"] == fm["config_hash"]  # the flag changes no result: a resume may change it
    assert {c: v["config_hash"] for c, v in pm["cells"].items()} == {c: v["config_hash"] for c, v in fm["cells"].items()}
    got, want = tokens(pd_), tokens(fd)
    assert len(got) == 9 and got == want  # warm-up included: the reused engine answers exactly as a fresh one


def test_a_failed_cell_drops_its_engine(ray_local, tmp_path_factory, monkeypatch):
    real = CellPlan.build_requests

    def failing(self, vocab_size, seed):  # raised inside the cell, while it holds the warm engine
        if self.cell_id == "in24-out4":
            raise RuntimeError("injected failure")
        return real(self, vocab_size, seed)

    monkeypatch.setattr(CellPlan, "build_requests", failing)
    _, m = run(tmp_path_factory, E1_THREE)
    cells = m["cells"]
    assert cells["in24-out4"]["status"] == "failed" and "injected failure" in cells["in24-out4"]["error"]
    assert cells["in24-out4"]["engine"] == "reused"
    assert cells["in32-out4"]["status"] == "ok" and cells["in32-out4"]["engine"] == "fresh"
    assert m["engine_pool"]["engine_starts"] == 2


def test_fresh_engines_is_a_cli_option_outside_the_hash():
    a, b = resolve("e1", {}), resolve("e1", {"fresh_engines": True})
    assert b.fresh_engines and config_hash(a) == config_hash(b)


# --- the pool's own rules, on stand-in deployments (no Ray) ----------------------------------


class Stub:
    def __init__(self, log: list[str], name: str, refuse: bool = False):
        self.log, self.name, self.refuse = log, name, refuse

    @property
    def engine_count(self) -> int:
        return 1

    async def begin(self, ctx) -> None:
        if self.refuse:
            raise RuntimeError("a request is still in the engine")
        self.log.append(f"begin {self.name}")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")


def ctx() -> SimpleNamespace:
    return SimpleNamespace(engine_use=None)


def test_pool_reuses_drops_refusers_and_evicts_other_keys():
    async def go():
        log: list[str] = []
        made = iter(["a1", "a2", "b1", "a3"])
        pool: EnginePool = EnginePool(reuse=True, capacity=1)

        async def make():
            return Stub(log, next(made))

        async def cell(key, refuse_next=False):
            c = ctx()
            async with pool.lease(c, key, make) as lease:  # type: ignore[arg-type]
                lease.deployment.refuse = refuse_next
            return c.engine_use

        assert (await cell("A")).engine == "fresh"
        assert (await cell("A", refuse_next=True)).engine == "reused"  # a1 now refuses the next cell
        use = await cell("A")  # a1 refuses: dropped, a2 starts
        assert use.engine == "fresh" and use.cell_on_engine == 1
        assert (await cell("B")).engine == "fresh"  # capacity 1: a2 (idle, other key) is evicted first
        with pytest.raises(ValueError):
            async with pool.lease(ctx(), "A", make):  # type: ignore[arg-type]
                raise ValueError("cell failed")
        await pool.close()
        return log, pool.engine_starts

    log, starts = asyncio.run(go())
    # a1 refused its third cell and was dropped; B's start evicted the idle a2 (capacity 1), the
    # failing cell's start evicted b1, and the failed a3 was dropped, not kept.
    assert log == ["begin a1", "begin a1", "close a1", "begin a2", "close a2", "begin b1", "close b1", "begin a3", "close a3"]
    assert starts == 4


def test_depth_two_queues_the_next_cell_behind_the_running_one_and_never_runs_another_key_beside_it():
    async def go():
        log: list[str] = []
        made = iter(["a1", "b1", "a2"])
        pool: EnginePool = EnginePool(reuse=True, capacity=1, depth=2)

        async def make():
            await asyncio.sleep(0.01)  # a start takes time: the second cell finds a deployment still starting
            return Stub(log, next(made))

        async def cell(name, key, hold, fail=False):
            c = ctx()
            try:
                async with pool.lease(c, key, make) as lease:  # type: ignore[arg-type]
                    log.append(f"{name} on {lease.deployment.name}")
                    await hold.wait()
                    log.append(f"{name} ends")
                    if fail:
                        raise ValueError("cell failed")
            except ValueError:
                pass
            return c.engine_use

        first, second, other = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.ensure_future(cell("x1", "A", first, fail=True))
        t2 = asyncio.ensure_future(cell("x2", "A", second))
        t3 = asyncio.ensure_future(cell("y1", "B", other))
        await asyncio.sleep(0.05)
        assert pool.engine_starts == 1  # x2 waits behind x1 on a1; y1 waits for room, not beside them
        first.set()  # x1 fails: a1 takes no new cell, but x2, already queued there, runs on it
        await asyncio.sleep(0.01)
        second.set()
        other.set()
        uses = await asyncio.gather(t1, t2, t3)
        x3 = await cell("x3", "A", first)  # a1 was dropped after x2: a fresh start (evicting the idle b1)
        await pool.close()
        return log, uses, x3, pool.engine_starts

    log, (x1, x2, y1), x3, starts = asyncio.run(go())
    assert (x1.engine, x2.engine, x2.cell_on_engine, y1.engine, x3.engine) == ("fresh", "reused", 2, "fresh", "fresh")
    assert log.index("x2 ends") < log.index("close a1") < log.index("begin b1")  # a1 closed once x2 left it, before b1 started
    # x2 holds its lease while x1 runs: the pool hands it over, the load generator runs them in turn.
    assert log.index("x2 on a1") < log.index("x1 ends")
    assert starts == 3


def test_only_a_run_whose_cells_all_reuse_warm_engines_queues_the_next_cell():
    assert pool_depth(True, ["aggregated"]) == QUEUE_DEPTH == 2
    assert pool_depth(False, ["aggregated"]) == 1  # fresh engines: each cell starts its own
    assert pool_depth(True, ["aggregated", "disaggregated"]) == 1  # E3: a pair per cell would wait on a placement it cannot use
    assert pool_depth(True, ["external"]) == 1
    assert EnginePool(reuse=False, depth=2).depth == 1


def test_grouped_keeps_first_appearance_order():
    assert grouped(["a1", "b1", "a2", "c1", "b2"], lambda s: s[0]) == ["a1", "a2", "b1", "b2", "c1"]


def test_modes_that_start_their_own_engines_record_them_fresh():
    def c(mode, use=None):
        return SimpleNamespace(plan=SimpleNamespace(serving_mode=mode), engine_use=use)

    assert engine_use_record(c("disaggregated"), 2)["engine"] == "fresh"  # type: ignore[arg-type, index]
    assert engine_use_record(c("disaggregated"), 2)["engine_starts"] == 2  # type: ignore[arg-type, index]
    assert engine_use_record(c("external"), 0)["engine"] == "none"  # type: ignore[arg-type, index]
    assert engine_use_record(c("aggregated"), 1) is None  # type: ignore[arg-type]  # failed before the pool leased it one
    use = EngineUse(engine="reused", engine_starts=0, pool_key="k", cell_on_engine=2, setup_s=0.01)
    assert engine_use_record(c("aggregated", use), 1)["engine"] == "reused"  # type: ignore[arg-type, index]


def test_a_disaggregated_cell_evicts_idle_warm_engines_that_hold_what_it_needs(ray_local, tmp_path_factory):
    # ray_local has 4 CPUs: the aggregated cell's two engines (2 CPUs each) take them all and stay
    # warm in the pool; the pair that follows needs the same 4 CPUs and must get them, not wait.
    cfg = resolve("e3", {"workload": {"num_requests": 2, "warmup_requests": 1}, "placement": {"cpus_per_engine": 2, "wait_timeout_s": 20}})
    d = Driver(cfg, RunOptions(out_dir=tmp_path_factory.mktemp("evict"), progress=False)).run()
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "complete", {c: v["status"] for c, v in m["cells"].items()}
    assert [m["cells"][c]["engine"] for c in ("aggregated", "disaggregated")] == ["fresh", "fresh"]


def test_a_dead_warm_engine_gives_way_and_a_fresh_one_keeps_the_failed_records(monkeypatch):
    from cluster.cells import aggregated
    from cluster.cells.base import CellResult

    engines = iter(["reused", "reused", "fresh"])
    tried: list[str] = []

    async def on_lease(ctx, pool):  # each lease: the pool's engine for it could not serve the cell
        ctx.engine_use = SimpleNamespace(engine=next(engines))
        tried.append(ctx.engine_use.engine)
        raise aggregated.EngineRefused(CellResult(requests=pd.DataFrame({"ok": [False]}), fault=f"engine0 memory: dead {len(tried)}"))

    monkeypatch.setattr(aggregated, "_on_lease", on_lease)
    got = asyncio.run(aggregated.run_aggregated(SimpleNamespace(pool=object(), engine_use=None)))  # type: ignore[arg-type]
    assert tried == ["reused", "reused", "fresh"]  # each warm one gave way; the fresh one's result is the cell's
    assert got.fault == "engine0 memory: dead 3" and got.requests["ok"].tolist() == [False]


def test_a_cells_engine_use_says_how_it_ran_where_a_queued_cell_overtook_the_one_that_started_the_engine():
    """Ray does not order an async actor's calls: the cell that started a deployment can run second.
    It is then the warm one (and gives way if the engine died under the first), the other fresh."""
    from actors.loadgen import CellLoad
    from cluster.cells.aggregated import _as_it_ran

    maker = EngineUse(engine="fresh", engine_starts=1, pool_key="k", cell_on_engine=1, setup_s=20.0)
    queued = EngineUse(engine="reused", engine_starts=0, pool_key="k", cell_on_engine=2, setup_s=20.0)
    ran = [CellLoad(requests=None, begin_s=0.0, load_s=1.0, after_s=0.1, memory=[None], cell_on_engine=n) for n in (2, 1)]  # type: ignore[arg-type]
    _as_it_ran(maker, ran[0])
    _as_it_ran(queued, ran[1])
    assert (maker.engine, maker.cell_on_engine, queued.engine, queued.cell_on_engine) == ("reused", 2, "fresh", 1)
    assert (maker.engine_starts, queued.engine_starts) == (1, 0)  # the start stays with the lease that made it


def test_a_report_asked_with_the_load_is_answered_when_the_cells_requests_have_drained(ray_local):
    from actors.engine_actor import EngineHost
    from actors.engines.spec import EngineConfig

    async def go():
        host = EngineHost(EngineConfig(kind="simulated").model_dump())
        await host.start()

        async def send(cell, rid, stop_after=None):
            request = {"request_id": rid, "prompt_token_ids": [1, 2, 3], "max_tokens": 4, "cell": cell}
            n = 0
            async for _ in host.generate(request):
                n += 1
                if n == stop_after:  # the client gives up mid-stream (a timeout): the request ends unfinished
                    break

        report = asyncio.ensure_future(host.cell_report("r", "a", 2))  # asked before any request of cell a
        await asyncio.sleep(0.05)
        assert host.cell == ("r", "a") and not report.done()  # the report began the cell, and waits for its requests
        await send(("r", "a"), "x")
        await asyncio.sleep(0.05)
        assert not report.done() and host.finished == 1
        await send(("r", "a"), "y", stop_after=1)  # an unfinished request counts too: it has left the engine
        got = await asyncio.wait_for(report, 5)
        assert got["in_flight"] == 0 and got["memory"] and host.finished == 2
        waiting = asyncio.ensure_future(host.cell_report("r", "a", 5))  # more than the cell will ever send
        await asyncio.sleep(0.05)
        cancelled = asyncio.ensure_future(host.cell_report("r", "a", 5))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(host._drain_waiters) == 1  # a cancelled report leaves no waiter behind
        await send(("r", "b"), "x")  # the engine moves on to another cell: the old report answers at once
        assert (await asyncio.wait_for(waiting, 5))["memory"] and host._drain_waiters == []
        await host.shutdown()

    asyncio.run(go())


def test_an_engine_begins_a_cell_on_its_first_marked_request_and_counts_it_out_at_its_last(ray_local):
    from actors.engine_actor import EngineHost
    from actors.engines.spec import EngineConfig

    async def go():
        host = EngineHost(EngineConfig(kind="simulated").model_dump())
        await host.start()

        async def send(cell, rid):
            request = {"request_id": rid, "prompt_token_ids": [1, 2, 3], "max_tokens": 2, "cell": cell}
            async for delta in host.generate(request):
                if delta["finished"]:
                    busy = host.in_flight  # the client stops reading here: nothing of its cell is left counted
            return busy

        await asyncio.gather(send(("r", "a"), "x"), send(("r", "a"), "y"))
        assert (host.cell, host.cells, host.tags["cell"]) == (("r", "a"), 1, "a")  # one begin for both requests
        assert await send(("r", "b"), "x") == 0 and (host.cell, host.cells) == (("r", "b"), 2)  # the only request: 0 left
        report = await host.cell_report("r", "c")  # a replica no request of cell c reached begins it to report
        assert (host.cell, host.cells, report["in_flight"]) == (("r", "c"), 3, 0) and report["memory"]
        await host.shutdown()

    asyncio.run(go())
