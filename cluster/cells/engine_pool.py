"""Warm engines across cells: a cell whose engine configuration another cell already started reuses
that running engine instead of paying a start (15–75 s per vLLM engine on GPU, ~1–3 s of actor
and placement-group start even for the simulated engine).

The pool holds deployments (a placement group and the actors on it) keyed by the engine part of
the cell hash plus what places it (bundle, engine count, strategy): cells with the same key are
interchangeable on it. A deployment serves one cell at a time; a second concurrent cell of the
same key starts its own. Between cells the deployment's `begin` makes cells independent (the
engine's prefix cache reset, new engine request ids, the live metrics' tags and the memory peak
windows of the new cell; the cell's own warm-up requests run as on a fresh engine), and refuses
when an earlier cell left a request in the engine: the pool then drops that deployment and starts
a fresh one. A cell that raised or noted a fault gives its deployment back as broken, and the pool
drops it, so one failure never reaches the next cell.

Idle deployments hold their resources; a cell that needs resources they hold evicts the least
recently used ones (at once when the pool holds as many deployments as cells may run at once,
else when its placement group does not come within EVICT_AFTER_S).

With `reuse=False` (config `fresh_engines`, CLI `--fresh-engines`) every cell starts and stops its
own deployment, as before the pool existed. Aggregated cells use the pool; disaggregated cells
start their prefill/decode pair per cell (their KV directory and transfer state are per cell), but
take their placement group through `place` too: idle warm engines give way to them (on 2 GPUs, E3's
aggregated engines would otherwise hold both GPUs while the pair waits for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from cluster import ray_env
from cluster.cells.base import CellContext, wait_for_placement
from cluster.config import sha256_of

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

EVICT_AFTER_S = 0.5
POOLED_MODES = ("aggregated",)


class Deployment(Protocol):
    """What the pool keeps warm between cells."""

    @property
    def engine_count(self) -> int:
        """Engines this deployment started."""

    async def begin(self, ctx: CellContext) -> None:
        """Make the deployment ready for `ctx`'s cell; raise where it cannot serve another cell."""

    async def close(self) -> None:
        """Stop its engines, kill its actors, release its placement group."""


D = TypeVar("D", bound=Deployment)
T = TypeVar("T")


@dataclass
class EngineUse:
    """A cell's engine, as its cell.json and the manifest record it."""

    engine: str  # "fresh": started for this cell; "reused": warm from an earlier cell of this run
    engine_starts: int  # engines started for this cell (0 when reused)
    pool_key: str | None  # the engine part of the cell hash and its placement (None: not pooled)
    cell_on_engine: int  # 1 for the deployment's first cell, 2 for the next, ...
    setup_s: float  # cell start to its engines ready (placement + start, or the reset between cells)
    load_s: float = 0.0  # the load generator's run (warm-up, hop probe, measured requests)
    # Where the rest of an aggregated cell's fixed cost (wall_s - load_s) goes, beside setup_s and the driver's own work:
    after_s: float = 0.0  # after the load: the reads (engine memory, router counts) and the typing of the records
    call_s: float = 0.0  # the driver's one call reaching the load generator (on one host; where the clocks differ: with reply_s)
    reply_s: float = 0.0  # its reply reaching the driver's loop, from the end of the reads


def pool_key(ctx: CellContext, bundles: list[dict[str, float]]) -> str:
    """Cells with equal keys can run on one deployment: same engine, same bundles, same strategy."""
    return sha256_of(
        {
            "engine": ctx.engine.model_dump(mode="json"),
            "bundles": bundles,
            "strategy": ctx.cfg.placement.strategy,
        }
    )


def engine_use_record(ctx: CellContext, engines: int) -> dict[str, Any] | None:
    """cell.json's `engine_use`: what the pool leased the cell; a mode that starts its own engines
    (disaggregated: `engines` of them; external: none) records them fresh; None where a pooled
    cell failed before it had an engine."""
    if ctx.engine_use is not None:
        return asdict(ctx.engine_use)
    if ctx.plan.serving_mode in POOLED_MODES:
        return None
    return asdict(EngineUse(engine="fresh" if engines else "none", engine_starts=engines, pool_key=None, cell_on_engine=1, setup_s=0.0))


def grouped(items: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """Stable grouping by key, groups in order of first appearance: a cell of each engine
    configuration follows the last, so the pool's warm engine is there for it."""
    groups: dict[Hashable, list[T]] = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    return [it for g in groups.values() for it in g]


@dataclass
class Lease(Generic[D]):
    deployment: D
    use: EngineUse
    # The cell sets this False when something went wrong after the requests ran (a fault): the
    # deployment is then dropped instead of kept for the next cell.
    healthy: bool = True


@dataclass
class _Slot(Generic[D]):
    key: str
    deployment: D
    cells: int = 0
    last_used: int = 0


class EnginePool(Generic[D]):
    def __init__(self, reuse: bool = True, capacity: int = 1):
        self.reuse = reuse
        self.capacity = capacity  # cells that may run at once: more deployments than that are never all needed
        self.engine_starts = 0
        self._idle: list[_Slot[D]] = []
        self._busy = 0
        self._clock = itertools.count()

    @contextlib.asynccontextmanager
    async def lease(self, ctx: CellContext, key: str, create: Callable[[], Awaitable[D]]) -> AsyncIterator[Lease[D]]:
        """A deployment for one cell: a warm one of this key, else a new one from `create`."""
        t0 = time.monotonic()
        slot = await self._warm(ctx, key)
        fresh = slot is None
        if slot is None:
            await self._make_room(key)
            slot = _Slot(key, await create())
            self.engine_starts += slot.deployment.engine_count
            try:
                await slot.deployment.begin(ctx)
            except BaseException:
                await slot.deployment.close()
                raise
        slot.cells += 1
        use = EngineUse(
            engine="fresh" if fresh else "reused",
            engine_starts=slot.deployment.engine_count if fresh else 0,
            pool_key=key[:16],
            cell_on_engine=slot.cells,
            setup_s=time.monotonic() - t0,
        )
        ctx.engine_use = use
        lease = Lease(slot.deployment, use)
        self._busy += 1
        ok = False
        try:
            yield lease
            ok = lease.healthy
        finally:
            self._busy -= 1
            if ok and self.reuse:
                slot.last_used = next(self._clock)
                self._idle.append(slot)
            else:
                await slot.deployment.close()

    async def _warm(self, ctx: CellContext, key: str) -> _Slot[D] | None:
        """The most recently used idle deployment of `key` that takes the cell; one that refuses is dropped."""
        while True:
            mine = [s for s in self._idle if s.key == key]
            if not mine:
                return None
            slot = max(mine, key=lambda s: s.last_used)
            self._idle.remove(slot)
            try:
                await slot.deployment.begin(ctx)
                return slot
            except Exception:  # broken between cells (a request left in it, a dead actor): start afresh
                await slot.deployment.close()

    async def _make_room(self, key: str) -> None:
        """Before a start: as many deployments as cells may run at once are enough; drop idle ones of other keys."""
        while self._idle and self._busy + len(self._idle) >= self.capacity:
            await self.evict_one()

    async def evict_one(self) -> bool:
        """Close the least recently used idle deployment; False when none is idle."""
        if not self._idle:
            return False
        slot = min(self._idle, key=lambda s: s.last_used)
        self._idle.remove(slot)
        await slot.deployment.close()
        return True

    async def place(self, ctx: CellContext, bundles: list[dict[str, float]], strategy: str, name: str) -> PlacementGroup:
        """A placement group for a new deployment; idle deployments holding the resources it waits
        for are evicted, oldest first, before it waits as any cell does (wait_for_placement)."""
        pg = ray_env.make_placement_group(bundles, strategy, name)
        try:
            ready = asyncio.ensure_future(_ready(pg))
            while self._idle:
                done, _ = await asyncio.wait([ready], timeout=EVICT_AFTER_S)
                if done:
                    break
                await self.evict_one()
            ready.cancel()
            await wait_for_placement(ctx, pg, bundles)
        except BaseException:
            ray_env.release(pg)
            raise
        return pg

    async def close(self) -> None:
        """End of the run: stop every idle deployment."""
        while await self.evict_one():
            pass


async def _ready(pg: PlacementGroup) -> Any:
    return await pg.ready()
