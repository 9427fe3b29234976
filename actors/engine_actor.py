"""The aggregated engine: one engine, prefill and decode, streaming token deltas.

`EngineHost` is the engine with what pdbench adds around it (request ids per cell, live metrics,
the serving node in each last delta). `EngineActor` runs it as a Ray actor, the entry the load
generator calls; `pdbench serve` runs it inside its Serve replica instead, so an HTTP request reaches
the engine without a Ray hop (cluster/serve.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.backends import HopProbe
from actors.engines import EngineConfig, EngineRequest, build_engine
from actors.metrics import cell_tags, metered


def actor_name(run_id: str, cell_id: str, role: str) -> str:
    """`pdbench:<run>:<cell>:<role>`: what the Ray dashboard lists, and how tests find actors."""
    return f"pdbench:{run_id}:{cell_id}:{role}"


def node_facts() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


class EngineHost(HopProbe):
    """Many `generate` streams share one engine, which batches them itself (async: one event loop)."""

    def __init__(self, engine_cfg: dict[str, Any], role: str = "engine"):
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.role = role
        self.engine = build_engine(self.cfg)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.cells = 0  # cells served; a warm engine's request ids are prefixed with it
        self.tags: dict[str, str] | None = None  # live metrics tags of the cell served now (None: the actor name's)
        self.in_flight = 0
        self.finished = 0  # requests of the cell begun last that have finished here
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []  # reports waiting for that count (cell_report)
        self.cell: tuple[str, str] | None = None  # (run id, cell id) begun last
        self.begin_s = 0.0  # what that begin took
        self._begin_lock = asyncio.Lock()

    async def begin_cell(self, run_id: str, cell_id: str) -> None:
        """Make a warm engine ready for another cell (cluster/cells/engine_pool.py): refused while an
        earlier cell's request is still in the engine (one that timed out), so the pool drops it;
        then the engine forgets what the last cell left (prefix cache, peak windows), the engine's
        request ids get a new prefix and the live metrics the new cell's tags."""
        if self.in_flight:
            raise RuntimeError(f"{self.in_flight} request(s) of an earlier cell are still in the engine")
        t = time.monotonic()
        await self.engine.reset()
        self.cells += 1
        self.tags = cell_tags(run_id, cell_id, self.role)
        self.cell, self.begin_s, self.finished = (run_id, cell_id), time.monotonic() - t, 0
        self._wake(everyone=True)  # a report still waiting belongs to a cell this engine has left

    async def _enter(self, cell: list[str] | tuple[str, str]) -> None:
        """The first request (or report) of a cell this engine has not begun begins it: the load
        generator marks its requests with their cell (LoadGenerator.run_cell) instead of a call per
        cell to begin it, a round trip that cost a cell ~0.3 s with 32 virtual nodes on 2 cores.
        The cell's other requests wait for that begin."""
        async with self._begin_lock:
            if tuple(cell) != self.cell:
                await self.begin_cell(cell[0], cell[1])

    async def cell_report(self, run_id: str, cell_id: str, drained: int | None = None) -> dict[str, Any]:
        """After a cell's load: its memory, what its begin took, and requests still in the engine
        (one that timed out: the pool then drops the engine rather than hand it to the next cell).
        With `drained`, asked with the cell's first request: answered once that many requests of the
        cell have finished here, so the report travels with the cell's last tokens instead of a
        round trip after them (~0.2 s at p50 with 32 virtual nodes on 2 cores); at once where the
        engine has since begun another cell."""
        if (run_id, cell_id) != self.cell:  # no request of the cell reached this replica (yet)
            await self._enter((run_id, cell_id))
        if drained is not None and self.finished < drained:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drain_waiters.append((drained, waiter))
            try:
                await waiter
            finally:  # answered, or cancelled by a load generator that asks again after a failed request
                self._drain_waiters = [w for w in self._drain_waiters if w[1] is not waiter]
        return {"memory": await self.memory(), "begin_s": self.begin_s, "in_flight": self.in_flight}

    def _wake(self, everyone: bool = False) -> None:
        for n, waiter in self._drain_waiters:
            if (everyone or self.finished >= n) and not waiter.done():
                waiter.set_result(None)

    def _finished_one(self) -> None:
        self.in_flight -= 1
        self.finished += 1
        self._wake()

    async def start(self) -> dict[str, Any]:
        info = await self.engine.start()
        return {**dataclasses.asdict(info), "node": node_facts(), "role": self.role}

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if (cell := request.get("cell")) is not None and tuple(cell) != self.cell:
            await self._enter(cell)
        async for delta in metered(self._generate(request), self.role, len(request["prompt_token_ids"]), self.tags):
            yield delta

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        # Inside the engine only: each cell's ids are new to a warm engine; the records keep the workload's.
        fields = {k: v for k, v in request.items() if k != "cell"}
        req = EngineRequest(**{**fields, "request_id": f"c{self.cells}-{request['request_id']}"})
        self.in_flight += 1
        counted = True
        try:
            async for delta in self.engine.generate(req):
                d = dataclasses.asdict(delta)
                if d["finished"]:  # which node served it: requests.parquet's `engine_node_id`, per request (replicas differ)
                    d["server"] = {**(d["server"] or {}), "engine_node_id": self.node_id}
                    # Out of the count before the client has its last message (it reads no end of stream):
                    # a cell_report right after the load finds no request of the cell left.
                    self._finished_one()
                    counted = False
                yield d
        finally:
            if counted:
                self._finished_one()

    async def memory(self) -> dict[str, Any]:
        """The engine's memory decomposition (keys documented on actors.engines.base.MemoryReport)."""
        return await self.engine.memory()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


@ray.remote
class EngineActor(EngineHost):
    """EngineHost as an async Ray actor: the aggregated cell's entry."""
