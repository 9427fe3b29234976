"""Aggregated cell: engine actors that each do prefill and decode, one bundle each.

One replica (the default) is the engine itself as the entry. Several replicas (E3 matches a
disaggregated pair's engine count) sit behind a ReplicaRouter that spreads the requests; the
bundles are packed on one node or spread over several as `placement.strategy` says.

The engines, the entry and the load generator on their placement group are one `Deployment`,
which the run's engine pool (cluster/cells/engine_pool.py) keeps warm for the next cell of the same
engine configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import ray

from actors.engine_actor import EngineActor
from actors.loadgen import CellLoad, LoadGenerator
from actors.metrics import cell_tags
from actors.router import ReplicaRouter
from cluster import ray_env
from cluster.cells.base import ENGINE_START_TIMEOUT_S, CellContext, CellResult, bounded
from cluster.cells.engine_pool import EnginePool, EngineUse, pool_key
from workloads.requests import PackedRequests

SHUTDOWN_TIMEOUT_S = 120.0


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return [ctx.engine_bundle()] * ctx.plan.replicas


@dataclass
class EngineGroup:
    """An aggregated cell's placement group and the actors on it."""

    pg: Any
    engines: list[Any]
    entry: Any
    loadgen: Any
    infos: list[dict[str, Any]]
    actors: list[Any] = field(default_factory=list)

    @property
    def engine_count(self) -> int:
        return len(self.engines)

    async def begin(self, ctx: CellContext) -> None:
        """Nothing to call: each engine begins the cell on the cell's first request to it, which the
        load generator marks (LoadGenerator.run_cell); an engine that cannot serve it fails the lease
        (EngineRefused, run_aggregated), one left busy by its cell is not kept (`engines_busy`)."""

    @property
    def router(self) -> Any:
        """The entry where it is a router in front of the engines, else None."""
        return self.entry if self.entry is not self.engines[0] else None

    async def close(self) -> None:
        """Engines stop first (a vLLM engine left running keeps its EngineCore process alive); one
        that fails or hangs past the bound is killed with the rest all the same."""
        with contextlib.suppress(RuntimeError):
            shutdowns = asyncio.gather(*(e.shutdown.remote() for e in self.engines), return_exceptions=True)
            await bounded(shutdowns, SHUTDOWN_TIMEOUT_S, "engine shutdown")
        for a in self.actors:
            ray.kill(a)
        ray_env.release(self.pg)


async def deploy(ctx: CellContext, pool: EnginePool[EngineGroup]) -> EngineGroup:
    """Place and start the engines, their entry and a load generator."""
    b = ctx.engine_bundle()
    n = ctx.plan.replicas
    pg = await pool.place(ctx, bundles(ctx), ctx.strategy(n), ctx.name("pg"))
    actors: list[Any] = []
    try:
        engines = [
            EngineActor.options(  # type: ignore[attr-defined]  # ray actor class
                name=ctx.name("engine" if n == 1 else f"engine{i}"),
                num_cpus=b["CPU"],
                num_gpus=b.get("GPU", 0),
                scheduling_strategy=ray_env.in_bundle(pg, i),
            ).remote(ctx.engine.model_dump(), role="engine")
            for i in range(n)
        ]
        actors += engines
        entry = engines[0]
        if n > 1:
            entry = ReplicaRouter.options(  # type: ignore[attr-defined]  # ray actor class
                name=ctx.name("router"), scheduling_strategy=ray_env.in_bundle(pg, 0)
            ).remote(engines)
            actors.append(entry)
        loadgen = LoadGenerator.options(  # type: ignore[attr-defined]  # ray actor class
            name=ctx.name("loadgen"), scheduling_strategy=ray_env.in_bundle(pg, 0)
        ).remote()
        actors.append(loadgen)
        counter = ctx.progress.counter if ctx.progress is not None else None  # the run's, as long as the pool
        served = loadgen.serve.remote(engines, entry if n > 1 else None, counter)
        infos = await bounded(asyncio.gather(*(e.start.remote() for e in engines)), ENGINE_START_TIMEOUT_S, "engine start")
        await served
    except BaseException:
        for a in actors:
            ray.kill(a)
        ray_env.release(pg)
        raise
    return EngineGroup(pg, engines, entry, loadgen, list(infos), actors)


class EngineRefused(RuntimeError):
    """A warm engine could not serve a cell (it died since its last cell: none of the cell's requests
    succeeded and it could not report); carries the cell's result, kept where the cell cannot run again."""

    def __init__(self, result: CellResult):
        super().__init__(result.fault)
        self.result = result


async def run_aggregated(ctx: CellContext) -> CellResult:
    # Without a run's pool (a cell run on its own), the cell starts and stops its own engines.
    pool: EnginePool[EngineGroup] = ctx.pool if ctx.pool is not None else EnginePool(reuse=False)
    while True:
        try:
            return await _on_lease(ctx, pool)
        except EngineRefused as e:
            # The lease ended with the error: the pool dropped that engine. A warm one may have died
            # since its last cell: the next lease takes another or starts one. A fresh one: the cell
            # keeps what it measured (its failed requests), as any cell whose requests all failed.
            if ctx.engine_use is None or ctx.engine_use.engine != "reused":
                return e.result


def _stages(use: EngineUse, got: CellLoad, t_call: float) -> None:
    """engine_use's stages of the cell's fixed cost, from the load generator's times and the call's."""
    # The engines begin the cell inside its first requests: that reset is setup, not load.
    use.setup_s, use.load_s, use.after_s = use.setup_s + got.begin_s, got.load_s - got.begin_s, got.after_s
    use.queued_s = got.queued_s
    use.gap_s = got.idle_before_s + got.begin_s if got.idle_before_s is not None else None
    hops = max(0.0, time.monotonic() - t_call - got.queued_s - got.load_s - got.after_s)  # the call and its reply
    use.call_s = min(hops, max(0.0, got.t_start - t_call))
    use.reply_s = hops - use.call_s


def _as_it_ran(use: EngineUse, got: CellLoad) -> None:
    """The cell's place on its deployment as the load generator ran it, not as the pool leased it:
    Ray does not order an async actor's calls, so a cell queued behind the one that started the
    deployment can run first; it is then the one on a fresh engine, and the other one, if that
    engine died, moves to another (run_aggregated). The engine starts stay with the lease that
    made them, so the run's count is exact whichever cell ran first or whether it ran at all."""
    use.engine, use.cell_on_engine = ("fresh" if got.cell_on_engine == 1 else "reused"), got.cell_on_engine


async def _on_lease(ctx: CellContext, pool: EnginePool[EngineGroup]) -> CellResult:
    n = ctx.plan.replicas
    meta: dict[str, Any] = {}
    async with pool.lease(ctx, pool_key(ctx, bundles(ctx)), lambda: deploy(ctx, pool)) as lease:
        d = lease.deployment
        info = d.infos[0]
        reqs = ctx.plan.build_requests(info["vocab_size"], ctx.seed)
        conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
        tags = cell_tags(ctx.run_id, ctx.plan.cell_id, "loadgen")
        identity = {"run_id": ctx.run_id, "cell_id": ctx.plan.cell_id, "serving_mode": "aggregated", "engine": ctx.engine.kind}
        t_call = time.monotonic()
        got: CellLoad = await d.loadgen.run_cell.remote(PackedRequests.of(reqs), conc, ctx.cfg.request_timeout_s, tags, identity)
        _stages(lease.use, got, t_call)
        _as_it_ran(lease.use, got)
        if n > 1:
            meta = {"replicas": n, "requests_per_replica": got.counts, "nodes": [i["node"] for i in d.infos]}
            meta["memory_per_replica"] = got.memory
        elif got.memory[0] is not None:
            meta = {"memory": got.memory[0]}  # memory.json and E5 hold single-engine cells
        result = CellResult(requests=got.requests, meta={"engine_info": info, **meta}, fault="; ".join(got.faults) or None)
        if got.faults and not pc.any(got.requests["ok"]).as_py():  # a dead engine: dropped (the lease ends with the error)
            raise EngineRefused(result)
        lease.healthy = not got.faults and not got.engines_busy
    return result
