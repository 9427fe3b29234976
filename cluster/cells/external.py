"""External cell: no engine of ours; the load generator drives the config's `target:` server over
HTTP (OpenAI-compatible /v1/completions), so the same tracks benchmark any such server.

The load generator runs on the node of the `pdbench run` process, so `target.base_url` means what
it means there (a loopback URL reaches a server on that machine).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.loadgen import LoadGenerator
from analysis.records import to_table
from cluster.cells.base import CellContext, CellResult

if TYPE_CHECKING:
    from actors.target import TargetSpec


def bundles(ctx: CellContext) -> list[dict[str, float]]:
    return []  # the load generator takes no CPU and the server is not ours to place


def _api_key(target: TargetSpec) -> str | None:
    name = target.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise RuntimeError(f"target.api_key_env: environment variable {name} is not set in the pdbench run process")
    return key


async def run_external(ctx: CellContext) -> CellResult:
    target = ctx.cfg.target
    assert target is not None, "external cells are planned only for a config with a target"
    api_key = _api_key(target)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    loadgen = LoadGenerator.options(  # type: ignore[attr-defined]  # ray actor class
        name=ctx.name("loadgen"), scheduling_strategy=here
    ).remote()
    try:
        reqs = ctx.plan.build_requests(target.vocab_size, ctx.seed)
        conc = getattr(ctx.plan.workload.arrival, "concurrency", 1)
        raws = await loadgen.run.remote(target, reqs, conc, ctx.cfg.request_timeout_s, ctx.progress, api_key)
    finally:
        ray.kill(loadgen)
    rows = to_table(raws, run_id=ctx.run_id, cell_id=ctx.plan.cell_id, serving_mode="external", engine="external")
    info = {"engine": "external", "model": target.model, "vocab_size": target.vocab_size, "base_url": target.base_url}
    return CellResult(requests=rows, meta={"engine_info": info})
