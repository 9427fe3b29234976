"""The disaggregation orchestrator: one request's prefill on one engine, its decode on another.

One pair of actors serves every KV transfer backend (actors/handoffs): the backend's two sides
move the KV, these actors do the rest. The decode actor is the pair's entry and streams `generate`
exactly like EngineActor, so the load generator cannot tell the modes apart. Per request it asks
the prefill actor to run the prompt under a fresh transfer key, lets its side bring the KV into
its engine and continue from there, and keeps the transfer record for the cell to collect. A
prefill or a transfer that fails (dead actor, lost object, timeout, failed load) is not the
request's end: the decode engine recomputes the prefill, and the record says why.

TTFT breakdown of a disaggregated request, each part measured in one process: queue and prefill
on the prefill engine; transfer from the prefill's reply to the KV in the decode engine (the
backend measures it); first decode the rest of the time from the reply to the first token here.
A recomputed request keeps the decode engine's own queue, prefill and first decode times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray

from actors.backends import HopProbe
from actors.engine_actor import node_facts
from actors.engines import EngineConfig, EngineRequest, TokenDelta
from actors.handoffs import backend_sides, check_backend
from actors.handoffs.base import Handoff, PairContext, Prefilled, PrefillReply
from actors.handoffs.spec import KVHandoffConfig
from actors.kv.directory import directory_actor, find_directory
from actors.kv.transport import reason_of
from actors.metrics import metered


def _context(engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], directory: str, run_id: str, cell_id: str) -> PairContext:
    return PairContext(EngineConfig.model_validate(engine_cfg), KVHandoffConfig.model_validate(kv_cfg), directory, run_id, cell_id)


def check_pair(p_info: dict[str, Any], d_info: dict[str, Any]) -> None:
    """Refuse a pair whose KV is not interchangeable."""
    if p_info["architecture"]["hash"] != d_info["architecture"]["hash"] or p_info["dtype"] != d_info["dtype"]:
        raise RuntimeError("prefill and decode engines differ in architecture or dtype; their KV is not interchangeable")
    p_sum, d_sum = p_info["extra"].get("weight_checksum"), d_info["extra"].get("weight_checksum")
    if p_sum != d_sum:  # dummy weights are seeded: both engines must hold the same ones
        raise RuntimeError(f"prefill and decode engines hold different weights ({p_sum} vs {d_sum})")


def first_decode_s(t_first: float, reply_at: float, transfer_s: float | None) -> float:
    """From KV in the decode engine to its first token. Zero, not negative, when that token came
    before the prefill's reply reached the decode actor: with KV sent layer by layer and the decode
    request submitted beside the prefill, the decode engine can finish while the reply is still
    on its way, and that hop is then part of no engine stage (the breakdown's `other`)."""
    return max(0.0, t_first - reply_at - (transfer_s or 0.0))


@dataclasses.dataclass(frozen=True)
class Pair:
    directory: Any
    prefill: Any
    decode: Any  # the entry


def launch_pair(
    engine: EngineConfig,
    kv: KVHandoffConfig,
    run_id: str,
    cell_id: str,
    name: Callable[[str], str],
    options: Callable[[str], dict[str, Any]],
    owned: list[Any],
) -> Pair:
    """The KV directory and the prefill and decode actors of one pair, not started yet (the cell
    runner and `pdbench serve` build the same pair). Each actor is named `name(role)`, gets Ray
    options `options(role)` ("kvdir", "prefill", "decode") and joins `owned` as soon as it exists,
    so the caller can kill whatever was made if a later step fails."""
    check_backend(kv.backend, engine.kind)
    e, k = engine.model_dump(mode="json"), kv.model_dump(mode="json")
    dir_name = name("kvdir")
    directory = directory_actor(dir_name, **options("kvdir"))
    owned.append(directory)
    prefill = PrefillActor.options(name=name("prefill"), **options("prefill")).remote(  # type: ignore[attr-defined]  # ray actor class
        e, k, dir_name, run_id, cell_id
    )
    owned.append(prefill)
    decode = DecodeActor.options(name=name("decode"), **options("decode")).remote(  # type: ignore[attr-defined]  # ray actor class
        e, k, prefill, dir_name, run_id, cell_id
    )
    owned.append(decode)
    return Pair(directory, prefill, decode)


async def start_pair(pair: Pair, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start both engines; their infos (prefill, decode) once they are known to share their KV."""
    try:
        p_info, d_info = await asyncio.wait_for(asyncio.gather(pair.prefill.start.remote(), pair.decode.start.remote()), timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"prefill and decode engine start: not done after {timeout_s:g} s") from None
    check_pair(p_info, d_info)
    return p_info, d_info


@ray.remote
class PrefillActor:
    def __init__(self, engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], directory: str, run_id: str, cell_id: str):
        ctx = _context(engine_cfg, kv_cfg, directory, run_id, cell_id)
        self.side = backend_sides(ctx.kv.backend, ctx.engine.kind).prefill(ctx)

    async def start(self) -> dict[str, Any]:
        info = await self.side.start()
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "prefill"}

    async def prefill(self, request: dict[str, Any], key: str) -> PrefillReply:
        """Run the prompt and send its KV under `key`; return the first token."""
        return await self.side.prefill(EngineRequest(**request), key)

    async def shutdown(self) -> None:
        await self.side.shutdown()


@ray.remote
class DecodeActor(HopProbe):
    def __init__(self, engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], prefill: Any, directory: str, run_id: str, cell_id: str):
        ctx = _context(engine_cfg, kv_cfg, directory, run_id, cell_id)
        self.side = backend_sides(ctx.kv.backend, ctx.engine.kind).decode(ctx)
        self.backend = ctx.kv.backend
        self.prefill = prefill
        self.directory_name = directory
        self.run_id, self.cell_id = run_id, cell_id
        self.directory: Any = None
        self._records: list[dict[str, Any]] = []

    async def start(self) -> dict[str, Any]:
        info = await self.side.start()
        self.directory = find_directory(self.directory_name)
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "decode"}

    def transfers(self) -> list[dict[str, Any]]:
        """The transfer records so far, handed over once (the cell collects them at its end)."""
        rows, self._records = self._records, []
        return rows

    async def shutdown(self) -> None:
        await self.side.shutdown()

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for delta in metered(self._generate(request), "decode", len(request["prompt_token_ids"])):
            yield delta

    async def decode_prefilled(self, request: dict[str, Any], key: str, reply: PrefillReply) -> AsyncIterator[dict[str, Any]]:
        """Continue a request whose prefill ran elsewhere (`reply` of the prefill actor, KV under
        `key`). `generate` is prefill + this; tests call it to tamper with the KV in between."""
        t0 = time.monotonic()
        h = self._handoff(EngineRequest(**request), key)
        h.prefilled.set_result(Prefilled(reply, None, t0))
        async for delta in self._decode(h, t0):
            yield delta

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        t0 = time.monotonic()
        h = self._handoff(EngineRequest(**request), f"{request['request_id']}/{secrets.token_hex(6)}")
        overlap = self.side.overlaps_prefill(h.req)
        call = asyncio.ensure_future(self._prefill(request, h, tell_directory=overlap))
        if not overlap:
            await call
        async for delta in self._decode(h, t0):
            yield delta

    def _handoff(self, req: EngineRequest, key: str) -> Handoff:
        return Handoff(req, key, self.run_id, self.cell_id, asyncio.get_running_loop().create_future())

    async def _prefill(self, request: dict[str, Any], h: Handoff, tell_directory: bool) -> None:
        """The prefill actor's reply, or the reason it failed (a dead prefill actor, an engine
        error). When the decode engine already waits for the KV, the failure is told to the
        directory at once, so that load fails now, not at its timeout."""
        try:
            reply, failure = await self.prefill.prefill.remote(request, h.key), None
            if reply["first_token"] is None:
                reply, failure = None, "prefill: RuntimeError: the prefill engine returned no token"
        except Exception as e:
            reply, failure = None, f"prefill: {reason_of(e)}"
        if failure is not None and tell_directory:
            await self.directory.fail.remote(h.key, failure)
        h.prefilled.set_result(Prefilled(reply, failure, time.monotonic()))

    async def _decode(self, h: Handoff, t0: float) -> AsyncIterator[dict[str, Any]]:
        t_first = None
        async for delta in self.side.decode(h):
            now = time.monotonic()
            t_first = t_first or now
            offset = (h.submitted or t0) - t0
            delta.token_s = [s + offset for s in delta.token_s]
            if delta.finished:
                self._finish(h, delta, t_first, now - t0)
            yield dataclasses.asdict(delta)

    def _finish(self, h: Handoff, delta: TokenDelta, t_first: float, e2e_s: float) -> None:
        """The request's server fields and its transfer record, once its last delta is out."""
        assert h.outcome is not None, "a KV backend's decode side must set the outcome before its last delta"
        o, p = h.outcome, h.prefilled.result()
        own = delta.server or {}
        if o.ok and p.reply is not None:
            server = {k: p.reply["server"].get(k) for k in ("server_queue_s", "prefill_s")}
            server["transfer_s"] = o.transfer_s
            server["first_decode_s"] = first_decode_s(t_first, p.at, o.transfer_s)
        else:  # recomputed here: this engine's own queue and prefill stand, as in aggregated
            server = {k: own.get(k) for k in ("server_queue_s", "prefill_s", "first_decode_s")}
            server["transfer_s"] = o.transfer_s
        prefix = self.side.own_stats_prefix
        delta.server = {**{f"{prefix}{k}": v for k, v in own.items()}, **server, **o.extra, "server_e2e_s": e2e_s, "kv_transfer_ok": o.ok}
        if o.retry_reason:
            delta.server["decode_retry_reason"] = o.retry_reason
        self._records.append({**o.record, "backend": self.backend})
