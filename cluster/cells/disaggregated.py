"""Disaggregated cell: a prefill engine and a decode engine on one placement group of two bundles.

Bundle 0 holds the prefill actor, bundle 1 the decode actor (the entry), the KV directory and the
load generator, so the directory lookups the decode side waits on stay on its node. PACK keeps
both bundles on one node (the transfer goes through one shared-memory object store), SPREAD puts
them on two (the fetch crosses the network). The pair itself is actors/disaggregated.py; the
cell returns the request rows and one transfers.parquet row per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from actors.disaggregated import Pair, launch_pair, start_pair
from actors.handoffs import KV_BACKENDS, refusal
from actors.loadgen import LoadGenerator
from analysis.records import to_table
from analysis.schemas import TRANSFERS
from analysis.transfers import transfers_frame
from cluster import ray_env
from cluster.cells.base import ENGINE_START_TIMEOUT_S, CellContext, CellRefused, CellResult, bounded, settle, wait_for_placement

PREFILL, DECODE = 0, 1


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return [ctx.engine_bundle(), ctx.engine_bundle()]


@dataclass
class _Measured:
    raws: list[Any]
    reqs: list[Any]
    infos: tuple[dict[str, Any], dict[str, Any]]  # prefill, decode
    load_wall_s: float
    transfers: list[dict[str, Any]]
    directory_left: Any
    connector: dict[str, Any]


def _launch(ctx: CellContext, pg: Any, owned: list[Any]) -> tuple[Pair, Any]:
    b = ctx.engine_bundle()
    engine_opts = {"num_cpus": b["CPU"], "num_gpus": b.get("GPU", 0)}

    def options(role: str) -> dict[str, Any]:
        at = {"scheduling_strategy": ray_env.in_bundle(pg, PREFILL if role == "prefill" else DECODE)}
        return at if role == "kvdir" else {**engine_opts, **at}

    pair = launch_pair(ctx.engine, ctx.cfg.kv_transfer, ctx.run_id, ctx.plan.cell_id, ctx.name, options, owned)
    loadgen = LoadGenerator.options(  # type: ignore[attr-defined]  # ray actor class
        name=ctx.name("loadgen"), scheduling_strategy=ray_env.in_bundle(pg, DECODE)
    ).remote()
    owned.append(loadgen)
    return pair, loadgen


_REFUSAL_CHECK_TIMEOUT_S = 120.0


async def _refuse_where_unable(ctx: CellContext, pg: Any) -> None:
    """Ask the KV backend, in the decode engine's bundle (its node, its GPU), whether it can run
    there; a reason ends the cell as refused before any engine starts."""
    b = ctx.engine_bundle()
    # One call per worker: a NIXL agent started by the check keeps a core busy while its process lives.
    probe = ray.remote(max_calls=1)(refusal).options(
        num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), scheduling_strategy=ray_env.in_bundle(pg, DECODE)
    )
    what = f"the {ctx.cfg.kv_transfer.backend} backend's check on the engine's node"
    reason = await bounded(probe.remote(ctx.cfg.kv_transfer.backend, ctx.engine.kind), _REFUSAL_CHECK_TIMEOUT_S, what)
    if reason:
        raise CellRefused(reason)


async def _measure(ctx: CellContext, pg: Any, owned: list[Any], faults: list[str]) -> _Measured:
    await wait_for_placement(ctx, pg, bundles(ctx))
    await _refuse_where_unable(ctx, pg)
    pair, loadgen = _launch(ctx, pg, owned)
    p_info, d_info = await start_pair(pair, ENGINE_START_TIMEOUT_S)
    reqs = ctx.plan.build_requests(d_info["vocab_size"], ctx.seed)
    conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
    t_load = time.monotonic()
    raws = await loadgen.run.remote(pair.decode, reqs, conc, ctx.cfg.request_timeout_s, ctx.progress)
    load_wall_s = time.monotonic() - t_load
    # What was measured is kept whatever dies now (a prefill or decode actor or the KV
    # directory mid-cell): each call is settled on its own and a failure is named in the cell status.
    rows = await settle("decode transfers", pair.decode.transfers.remote(), faults, default=[])
    directory_left = await settle("KV directory stats", pair.directory.stats.remote(), faults)
    connector = await settle("KV directory engines", pair.directory.engines.remote(), faults, default={})
    await settle("decode shutdown", pair.decode.shutdown.remote(), faults)
    await settle("prefill shutdown", pair.prefill.shutdown.remote(), faults)
    return _Measured(raws, reqs, (p_info, d_info), load_wall_s, rows, directory_left, connector)


def _meta(ctx: CellContext, m: _Measured) -> dict[str, Any]:
    p_info, d_info = m.infos
    return {
        "engine_info": d_info,
        "prefill_info": p_info,
        "nodes": {"prefill": p_info["node"]["node_id"], "decode": d_info["node"]["node_id"]},
        "placement_strategy": ctx.cfg.placement.strategy,
        "kv_directory_at_end": m.directory_left,
        # Per engine (vLLM connector only): wall time its steps spent in the connector, over the
        # load phase's wall time (docs/metrics.md: stall).
        "kv_connector": {
            e.rsplit("/", 1)[-1]: {**v, "load_wall_s": m.load_wall_s, "stall": v["blocked_s"] / m.load_wall_s if m.load_wall_s else None}
            for e, v in m.connector.items()
        },
        "weights_identical": p_info["extra"].get("weight_checksum") == d_info["extra"].get("weight_checksum"),
        "weight_checksum": d_info["extra"].get("weight_checksum"),
    }


async def run_disaggregated(ctx: CellContext) -> CellResult:
    backend = ctx.cfg.kv_transfer.backend
    problem = KV_BACKENDS.get(backend).serves(backend, ctx.engine.kind)
    if problem:  # known here, before any resources are held
        raise CellRefused(problem)
    if ctx.pool is not None:  # warm engines of earlier cells give way where they hold what the pair needs
        pg = await ctx.pool.place(ctx, bundles(ctx), ctx.strategy(2), ctx.name("pg"))
    else:
        pg = ray_env.make_placement_group(bundles(ctx), ctx.strategy(2), ctx.name("pg"))
    owned: list[Any] = []
    faults: list[str] = []
    try:
        m = await _measure(ctx, pg, owned, faults)
    finally:
        for a in owned:
            ray.kill(a)
        ray_env.release(pg)
    rows = to_table(m.raws, run_id=ctx.run_id, cell_id=ctx.plan.cell_id, serving_mode="disaggregated", engine=ctx.engine.kind)
    moved = TRANSFERS.table(transfers_frame(m.transfers, {r.request_id: r.warmup for r in m.reqs}))
    return CellResult(requests=rows, transfers=moved, meta=_meta(ctx, m), fault="; ".join(faults) or None)
