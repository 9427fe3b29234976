"""What every cell runner gets and gives back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actors.engines import EngineConfig
from actors.progress import CellCounter
from cluster.config import ExperimentConfig
from workloads.tracks import CellPlan

if TYPE_CHECKING:
    from cluster.cells.engine_pool import EnginePool, EngineUse

ENGINE_START_TIMEOUT_S = 900.0
WAIT_NOTICE_S = 10.0  # a cell still waiting for resources after this says so
log = logging.getLogger("pdbench")


async def bounded(pending: Awaitable[Any], timeout_s: float, what: str) -> Any:
    """Await with a bound; running out says what was awaited instead of a bare TimeoutError."""
    try:
        return await asyncio.wait_for(pending, timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what}: not done after {timeout_s:g} s") from None


async def wait_for_placement(ctx: CellContext, pg: Any, bundles: list[dict[str, float]]) -> None:
    """A placement group whose resources exist but are held (another job, another cell) waits:
    it says what for after WAIT_NOTICE_S, and gives up after `placement.wait_timeout_s`."""

    async def ready() -> Any:
        return await pg.ready()

    limit = ctx.cfg.placement.wait_timeout_s
    task = asyncio.ensure_future(ready())
    done, _ = await asyncio.wait([task], timeout=min(WAIT_NOTICE_S, limit))
    if not done:
        log.warning("cell %s waits for resources %s (placement group); gives up after %g s", ctx.plan.cell_id, bundles, limit)
        done, _ = await asyncio.wait([task], timeout=max(0.0, limit - WAIT_NOTICE_S))
    if not done:
        task.cancel()
        raise RuntimeError(
            f"placement.wait_timeout_s: the cell waited {limit:g} s for {bundles} and the cluster never had them free "
            "(held by other jobs or cells); free them, or raise placement.wait_timeout_s"
        )
    task.result()


@dataclass
class CellContext:
    run_id: str
    cfg: ExperimentConfig
    plan: CellPlan
    engine: EngineConfig
    seed: int
    progress: CellCounter | None  # the cell's share of the run's progress counter (None: no display)
    pool: EnginePool | None = None  # warm engines of the run (None: the cell starts and stops its own)
    engine_use: EngineUse | None = None  # set by the pool when it leases the cell its engines

    def name(self, role: str) -> str:
        from actors.engine_actor import actor_name

        return actor_name(self.run_id, self.plan.cell_id, role)

    def strategy(self, bundles: int) -> str:
        """Ray placement strategy for a cell of several engine bundles: `placement.strategy` PACK
        keeps them on one node, SPREAD puts each on its own node (refused at once, naming the field,
        where the cluster has too few nodes, instead of waiting for a placement that never comes)."""
        if bundles == 1 or self.cfg.placement.strategy == "PACK":
            return "STRICT_PACK"
        import ray

        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive < bundles:
            raise RuntimeError(
                f"placement.strategy: SPREAD puts each of this cell's {bundles} engines on its own node, "
                f"but the cluster has {alive} node(s); use PACK"
            )
        return "STRICT_SPREAD"

    def engine_bundle(self) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.cfg.placement.cpus_per_engine}
        if self.cfg.gpus_per_engine():
            b["GPU"] = float(self.cfg.gpus_per_engine())
        return b


class CellRefused(RuntimeError):
    """A cell that cannot run on this machine (its KV backend lacks a library, a device, a
    transport): a measured answer with its one-line reason, not a failure; the run goes on."""


@dataclass
class CellResult:
    requests: pa.Table  # typed by analysis/schemas.py's REQUESTS (analysis.records.to_table)
    meta: dict[str, Any] = field(default_factory=dict)
    transfers: pa.Table | None = None  # typed by TRANSFERS
    # A fault after the requests ran (an actor died, a final stats or shutdown call failed): the
    # records measured so far are kept, and the cell says what went wrong.
    fault: str | None = None


async def settle(what: str, pending: Awaitable[Any], faults: list[str], default: Any = None) -> Any:
    """Await a call made after the requests ran; a failure is noted in `faults`, not raised, so
    it cannot cost the cell the records already measured."""
    from analysis.errortext import one_line

    try:
        return await pending
    except Exception as e:
        faults.append(f"{what}: {one_line(e)}")
        return default
