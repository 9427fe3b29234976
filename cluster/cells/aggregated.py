"""Aggregated cell: engine actors that each do prefill and decode, one bundle each.

One replica (the default) is the engine itself as the entry. Several replicas (E3 matches a
disaggregated pair's engine count) sit behind a ReplicaRouter that spreads the requests; the
bundles are packed on one node or spread over several as `placement.strategy` says.
"""

from __future__ import annotations

import asyncio

import ray

from actors.engine_actor import EngineActor
from actors.loadgen import LoadGenerator
from actors.router import ReplicaRouter
from analysis.records import to_frame
from cluster import ray_env
from cluster.cells.base import ENGINE_START_TIMEOUT_S, CellContext, CellResult, bounded, settle, wait_for_placement


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return [ctx.engine_bundle()] * ctx.plan.replicas


async def run_aggregated(ctx: CellContext) -> CellResult:
    b = ctx.engine_bundle()
    n = ctx.plan.replicas
    pg = ray_env.make_placement_group(bundles(ctx), ctx.strategy(n), ctx.name("pg"))
    actors = []
    meta = {}
    faults: list[str] = []
    try:
        await wait_for_placement(ctx, pg, bundles(ctx))
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
        infos = await bounded(asyncio.gather(*(e.start.remote() for e in engines)), ENGINE_START_TIMEOUT_S, "engine start")
        info = infos[0]
        reqs = ctx.plan.build_requests(info["vocab_size"], ctx.seed)
        conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
        raws = await loadgen.run.remote(entry, reqs, conc, ctx.cfg.request_timeout_s, ctx.progress)
        memory = [await settle(f"engine{i} memory", e.memory.remote(), faults) for i, e in enumerate(engines)]
        if n > 1:
            counts = await settle("router counts", entry.counts.remote(), faults)
            meta = {"replicas": n, "requests_per_replica": counts, "nodes": [i["node"] for i in infos]}
            meta["memory_per_replica"] = list(memory)
        elif memory[0] is not None:
            meta = {"memory": memory[0]}  # memory.json and E5 hold single-engine cells
        for i, e in enumerate(engines):
            await settle(f"engine{i} shutdown", e.shutdown.remote(), faults)
    finally:
        for a in actors:
            ray.kill(a)
        ray_env.release(pg)
    df = to_frame(raws, run_id=ctx.run_id, cell_id=ctx.plan.cell_id, serving_mode="aggregated", engine=ctx.engine.kind)
    return CellResult(requests=df, meta={"engine_info": info, **meta}, fault="; ".join(faults) or None)
