"""Aggregated cell: one engine actor does prefill and decode, on a one-bundle placement group."""

from __future__ import annotations

import asyncio

import ray

from actors.engine_actor import EngineActor
from actors.loadgen import LoadGenerator
from analysis.records import to_frame
from cluster import ray_env
from cluster.cells.base import ENGINE_START_TIMEOUT_S, CellContext, CellResult
from workloads.requests import synthetic_requests


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return [ctx.engine_bundle()]


async def run_aggregated(ctx: CellContext) -> CellResult:
    b = ctx.engine_bundle()
    pg = ray_env.make_placement_group([b], "STRICT_PACK", ctx.name("pg"))
    actors = []
    try:
        await asyncio.wait_for(pg.ready(), ENGINE_START_TIMEOUT_S)
        engine = EngineActor.options(
            name=ctx.name("engine"),
            num_cpus=b["CPU"],
            num_gpus=b.get("GPU", 0),
            scheduling_strategy=ray_env.in_bundle(pg, 0),
        ).remote(ctx.engine.model_dump(), role="engine")
        loadgen = LoadGenerator.options(name=ctx.name("loadgen"), scheduling_strategy=ray_env.in_bundle(pg, 0)).remote()
        actors = [engine, loadgen]
        info = await asyncio.wait_for(engine.start.remote(), ENGINE_START_TIMEOUT_S)
        reqs = synthetic_requests(ctx.plan.workload, info["vocab_size"], ctx.seed)
        conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
        raws = await loadgen.run.remote(engine, reqs, conc, ctx.cfg.request_timeout_s, ctx.progress)
        await engine.shutdown.remote()
    finally:
        for a in actors:
            ray.kill(a)
        ray_env.release(pg)
    df = to_frame(raws, run_id=ctx.run_id, cell_id=ctx.plan.cell_id, mode="aggregated", engine=ctx.engine.kind)
    return CellResult(requests=df, meta={"engine_info": info})
