"""Disaggregated cell: a prefill engine and a decode engine on one placement group of two bundles.

Bundle 0 holds the prefill actor, bundle 1 the decode actor (the entry), the KV directory and the
load generator, so the directory lookups the decode side waits on stay on its node. PACK keeps
both bundles on one node (the transfer goes through one shared-memory object store), SPREAD puts
them on two (the fetch crosses the network). The cell returns the request rows and one
transfers.parquet row per request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from actors.kv.directory import directory_actor
from actors.loadgen import LoadGenerator
from analysis.records import to_frame
from analysis.transfers import transfers_frame
from cluster import ray_env
from cluster.cells.base import ENGINE_START_TIMEOUT_S, CellContext, CellResult, bounded, settle, wait_for_placement

PREFILL, DECODE = 0, 1


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return [ctx.engine_bundle(), ctx.engine_bundle()]


def pair_classes(kind: str) -> tuple[Any, Any]:
    """(PrefillActor, DecodeActor) for an engine kind; `pdbench serve` builds the same pair."""
    # torch (and vllm): imported only where a cell runs
    if kind == "reference":
        from actors.disaggregated import DecodeActor, PrefillActor

        return PrefillActor, DecodeActor
    if kind == "vllm":
        from actors.vllm_disaggregated import VllmDecodeActor, VllmPrefillActor

        return VllmPrefillActor, VllmDecodeActor
    raise ValueError(f"engine.kind: disaggregated cells move real KV tensors (reference or vllm engines), not {kind!r}")


def check_pair(p_info: dict[str, Any], d_info: dict[str, Any]) -> None:
    """Refuse a pair whose KV is not interchangeable."""
    if p_info["architecture"]["hash"] != d_info["architecture"]["hash"] or p_info["dtype"] != d_info["dtype"]:
        raise RuntimeError("prefill and decode engines differ in architecture or dtype; their KV is not interchangeable")
    p_sum, d_sum = p_info["extra"].get("weight_checksum"), d_info["extra"].get("weight_checksum")
    if p_sum != d_sum:  # dummy weights are seeded: both engines must hold the same ones
        raise RuntimeError(f"prefill and decode engines hold different weights ({p_sum} vs {d_sum})")


async def run_disaggregated(ctx: CellContext) -> CellResult:
    PrefillActor, DecodeActor = pair_classes(ctx.engine.kind)

    b = ctx.engine_bundle()
    pg = ray_env.make_placement_group(bundles(ctx), ctx.strategy(2), ctx.name("pg"))
    actors: list = []
    faults: list[str] = []
    try:
        await wait_for_placement(ctx, pg, bundles(ctx))
        dir_name = ctx.name("kvdir")
        directory = directory_actor(dir_name, scheduling_strategy=ray_env.in_bundle(pg, DECODE))
        actors.append(directory)
        engine = ctx.engine.model_dump()
        kv = ctx.cfg.kv_transfer.model_dump()
        ident = (ctx.run_id, ctx.plan.cell_id)
        gpus = b.get("GPU", 0)
        prefill = PrefillActor.options(
            name=ctx.name("prefill"), num_cpus=b["CPU"], num_gpus=gpus, scheduling_strategy=ray_env.in_bundle(pg, PREFILL)
        ).remote(engine, kv, dir_name, *ident)
        actors.append(prefill)
        decode = DecodeActor.options(
            name=ctx.name("decode"), num_cpus=b["CPU"], num_gpus=gpus, scheduling_strategy=ray_env.in_bundle(pg, DECODE)
        ).remote(engine, kv, prefill, dir_name, *ident)
        actors.append(decode)
        loadgen = LoadGenerator.options(  # type: ignore[attr-defined]  # ray actor class
            name=ctx.name("loadgen"), scheduling_strategy=ray_env.in_bundle(pg, DECODE)
        ).remote()
        actors.append(loadgen)
        p_info, d_info = await bounded(
            asyncio.gather(prefill.start.remote(), decode.start.remote()), ENGINE_START_TIMEOUT_S, "prefill and decode engine start"
        )
        check_pair(p_info, d_info)
        reqs = ctx.plan.build_requests(d_info["vocab_size"], ctx.seed)
        conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
        t_load = time.monotonic()
        raws = await loadgen.run.remote(decode, reqs, conc, ctx.cfg.request_timeout_s, ctx.progress)
        load_wall_s = time.monotonic() - t_load
        # What was measured is kept whatever dies now (a prefill or decode actor or the KV
        # directory mid-cell): each call is settled on its own and a failure is named in the cell status.
        rows = await settle("decode transfers", decode.transfers.remote(), faults, default=[])
        directory_left = await settle("KV directory stats", directory.stats.remote(), faults)
        connector = await settle("KV directory engines", directory.engines.remote(), faults, default={})
        await settle("decode shutdown", decode.shutdown.remote(), faults)
        await settle("prefill shutdown", prefill.shutdown.remote(), faults)
    finally:
        for a in actors:
            ray.kill(a)
        ray_env.release(pg)
    df = to_frame(raws, run_id=ctx.run_id, cell_id=ctx.plan.cell_id, serving_mode="disaggregated", engine=ctx.engine.kind)
    warm = {r.request_id: r.warmup for r in reqs}
    transfers = transfers_frame(rows)
    transfers["warmup"] = transfers["request_id"].map(warm).fillna(False).astype(bool)
    meta = {
        "engine_info": d_info,
        "prefill_info": p_info,
        "nodes": {"prefill": p_info["node"]["node_id"], "decode": d_info["node"]["node_id"]},
        "placement_strategy": ctx.cfg.placement.strategy,
        "kv_directory_at_end": directory_left,
        # Per engine (vLLM connector only): wall time its steps spent in the connector, over the
        # load phase's wall time (docs/metrics.md: stall).
        "kv_connector": {
            e.rsplit("/", 1)[-1]: {**v, "load_wall_s": load_wall_s, "stall": v["blocked_s"] / load_wall_s if load_wall_s else None}
            for e, v in connector.items()
        },
        "weights_identical": p_info["extra"].get("weight_checksum") == d_info["extra"].get("weight_checksum"),
        "weight_checksum": d_info["extra"].get("weight_checksum"),
    }
    return CellResult(requests=df, transfers=transfers, meta=meta, fault="; ".join(faults) or None)
