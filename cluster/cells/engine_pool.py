"""Warm engines across cells: a cell whose engine configuration another cell already started reuses
that running engine instead of paying a start (15–75 s per vLLM engine on GPU, ~1–3 s of actor
and placement-group start even for the simulated engine).

The pool holds deployments (a placement group and the actors on it) keyed by the engine part of
the cell hash plus what places it (bundle, engine count, strategy): cells with the same key are
interchangeable on it. A deployment serves one cell at a time. With `depth` 2 (a run whose cells
all run on warm engines, cluster/driver.py) the next cell of the same key is handed to a busy
deployment and its call waits in the load generator behind the running cell (actors/loadgen.py
`run_cell`), so the call and the reply travel while the engine works instead of between its cells;
otherwise a second concurrent cell of the same key starts its own. Between cells the deployment's
`begin` makes cells independent (the
engine's prefix cache reset, new engine request ids, the live metrics' tags and the memory peak
windows of the new cell; the cell's own warm-up requests run as on a fresh engine), and refuses
when an earlier cell left a request in the engine: the pool then drops that deployment and starts
a fresh one. A cell that raised or noted a fault gives its deployment back as broken, and the pool
drops it, so one failure never reaches the next cell: no cell is handed to it from then on, and it
closes when the cell already queued behind (with `depth` 2) has run. That cell's engines refuse it
where the failed cell left a request in them (EngineHost.begin_cell), and it moves to another
engine (cluster/cells/aggregated.py `run_aggregated`).

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
# Cells a warm deployment holds at once where every cell of the run is pooled: the running one and
# the next, whose call waits in the load generator. With 32 virtual nodes on 2 cores the call and the
# reply each took ~0.1-0.2 s between two cells' loads; queued, they travel during the load. A
# disaggregated cell starts its own pair, and one queued behind it would hold a placement it cannot use.
QUEUE_DEPTH = 2


def pool_depth(reuse: bool, serving_modes: Iterable[str]) -> int:
    """`EnginePool.depth` for a run of these modes: QUEUE_DEPTH where warm engines serve every cell, else 1."""
    return QUEUE_DEPTH if reuse and set(serving_modes) <= set(POOLED_MODES) else 1


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

    # Where a cell queued behind another runs first (Ray does not order an async actor's calls), `engine`
    # and `cell_on_engine` say how the cells ran, not how they were leased (aggregated.py `_as_it_ran`).
    engine: str  # "fresh": the deployment's first cell; "reused": warm from an earlier cell of this run
    engine_starts: int  # engines this cell's lease started (0 when it found them started)
    pool_key: str | None  # the engine part of the cell hash and its placement (None: not pooled)
    cell_on_engine: int  # 1 for the deployment's first cell, 2 for the next, ...
    setup_s: float  # cell start to its engines ready (placement + start, or the reset between cells)
    load_s: float = 0.0  # the load generator's run (warm-up, hop probe, measured requests)
    # Where the rest of an aggregated cell's fixed cost (wall_s - load_s) goes, beside setup_s and the driver's own work:
    after_s: float = 0.0  # after the load: the reads (engine memory, router counts) and the typing of the records
    call_s: float = 0.0  # the driver's one call reaching the load generator (on one host; where the clocks differ: with reply_s)
    reply_s: float = 0.0  # its reply reaching the driver's loop, from the end of the reads
    queued_s: float = 0.0  # waiting in the load generator behind the cell before it on the deployment (depth 2)
    # The deployment's time between the previous cell's load and this cell's: that cell's reads and
    # typing, the wait for this cell's call, the engines' reset. None for a deployment's first cell.
    gap_s: float | None = None


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
    made: asyncio.Future[D | None]  # the deployment once started; None where its start failed
    cells: int = 0
    last_used: int = 0
    leases: int = 0  # cells holding it: the one running and the one queued behind it
    broken: bool = False  # a cell on it failed: no more cells, closed when its last lease ends

    @property
    def deployment(self) -> D:
        d = self.made.result()
        assert d is not None  # only a started slot is leased
        return d

    @property
    def idle(self) -> bool:
        return self.leases == 0 and self.made.done()


class EnginePool(Generic[D]):
    def __init__(self, reuse: bool = True, capacity: int = 1, depth: int = 1):
        self.reuse = reuse
        self.capacity = capacity  # cells that may run at once: more deployments than that are never all needed
        self.depth = depth if reuse else 1  # cells one deployment holds at once: the running one and those queued behind
        self.engine_starts = 0
        self._slots: list[_Slot[D]] = []  # every deployment, started or starting
        self._clock = itertools.count()
        self._freed = asyncio.Event()  # set as a lease ends: a start waiting for room looks again

    @property
    def _idle(self) -> list[_Slot[D]]:
        return [s for s in self._slots if s.idle]

    @contextlib.asynccontextmanager
    async def lease(self, ctx: CellContext, key: str, create: Callable[[], Awaitable[D]]) -> AsyncIterator[Lease[D]]:
        """A deployment for one cell: a warm one of this key, else a place behind a busy one of this
        key (`depth` 2), else a new one from `create`."""
        t0 = time.monotonic()
        slot, fresh = await self._take(ctx, key, create)
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
        ok = False
        try:
            yield lease
            ok = lease.healthy
        finally:
            slot.leases -= 1
            slot.last_used = next(self._clock)
            slot.broken = slot.broken or not (ok and self.reuse)
            if slot.broken and slot.leases == 0:
                self._slots.remove(slot)
                await slot.deployment.close()
            self._freed.set()

    async def _take(self, ctx: CellContext, key: str, create: Callable[[], Awaitable[D]]) -> tuple[_Slot[D], bool]:
        """The cell's slot, leased, its deployment begun for the cell; whether the cell started it."""
        while True:
            slot = self._pick(key)
            if slot is None:
                return await self._start(ctx, key, create), True
            slot.leases += 1
            try:
                made = await asyncio.shield(slot.made)  # shielded: a cancelled cell leaves the others' future alone
            except BaseException:
                slot.leases -= 1
                raise
            if made is None:  # its start failed: that cell has the error, this one looks again
                slot.leases -= 1
                continue
            try:
                await slot.deployment.begin(ctx)
                return slot, False
            except Exception:  # broken between cells (a request left in it, a dead actor): start afresh
                slot.leases -= 1
                slot.broken = True
                if slot.leases == 0:
                    self._slots.remove(slot)
                    await slot.deployment.close()
                    self._freed.set()

    def _pick(self, key: str) -> _Slot[D] | None:
        """The most recently used idle deployment of `key`, else one of `key` with room behind its cell."""
        mine = [s for s in self._slots if s.key == key and not s.broken]
        idle = [s for s in mine if s.idle]
        if idle:
            return max(idle, key=lambda s: s.last_used)
        busy = [s for s in mine if s.leases < self.depth]
        return min(busy, key=lambda s: s.leases) if busy else None

    async def _start(self, ctx: CellContext, key: str, create: Callable[[], Awaitable[D]]) -> _Slot[D]:
        await self._make_room()
        slot: _Slot[D] = _Slot(key, asyncio.get_running_loop().create_future(), leases=1)
        self._slots.append(slot)
        try:
            d = await create()
        except BaseException:
            self._drop_unstarted(slot)
            raise
        self.engine_starts += d.engine_count
        try:
            await d.begin(ctx)
        except BaseException:
            self._drop_unstarted(slot)
            await d.close()
            raise
        slot.made.set_result(d)
        return slot

    def _drop_unstarted(self, slot: _Slot[D]) -> None:
        """A start that failed: cells queued for it look again (`_take`), starts waiting for room too."""
        self._slots.remove(slot)
        slot.made.set_result(None)
        self._freed.set()

    async def _make_room(self) -> None:
        """Before a start: as many deployments as cells may run at once are enough; drop idle ones of
        other keys, or wait for one to become idle (with `depth` 2 more cells than deployments are
        leased, and a cell of another key must not run beside them: CPU cells run one at a time)."""
        while len(self._slots) >= self.capacity:
            if not await self.evict_one():
                self._freed.clear()
                await self._freed.wait()

    async def evict_one(self) -> bool:
        """Close the least recently used idle deployment; False when none is idle."""
        idle = self._idle
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.last_used)
        self._slots.remove(slot)
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
