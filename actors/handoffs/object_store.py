"""Reference engines, KV through Ray's object store: the pair's actors move the KV themselves.

The prefill side returns the first token as soon as its prefill is done and publishes the KV in
the background, layer group by layer group (actors/kv/transport.py). The decode side pulls it
into a fresh sequence state before its engine continues; if it does not arrive (prefill actor
dead, object lost, timeout) the decode engine recomputes the prefill. Transfer time runs from the
prefill's reply to the KV injected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.engines import EngineConfig, EngineInfo, EngineRequest, TokenDelta, build_engine
from actors.engines.batching import BatchingEngine, Prefilled
from actors.handoffs.base import Handoff, Outcome, PairContext, PrefillReply, Sides
from actors.kv import putter
from actors.kv.accounting import TransferRecord
from actors.kv.directory import find_directory
from actors.kv.rdt import start_tensor_transport
from actors.kv.transport import CopyInto, publish, reason_of, receive

# Publishing and receiving block (ray.put, ray.get, waits on the directory), so they run in
# threads; one per request in flight, lest a waiting receive hold up another request's transfer.
_TRANSFER_THREADS = 256


def _kv_engine(cfg: EngineConfig) -> BatchingEngine:
    engine = build_engine(cfg)
    if cfg.kind != "reference" or not isinstance(engine, BatchingEngine):
        raise ValueError(
            f"engine.kind: disaggregated serving moves real KV tensors; it runs the reference engine "
            f"(vllm disaggregates through its KV connector), not {cfg.kind!r}"
        )
    return engine


class ObjectStorePrefill:
    def __init__(self, ctx: PairContext):
        if ctx.kv.decode_submit != "after_prefill":
            raise ValueError("kv_transfer.decode_submit: the reference pair moves the KV after the prefill; use 'after_prefill'")
        self.ctx = ctx
        self.engine = _kv_engine(ctx.engine)
        self.directory: Any = None
        self._publishing: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="pdbench-kv-put")

    async def start(self) -> EngineInfo:
        info = await self.engine.start()
        self.directory = find_directory(self.ctx.directory)
        start_tensor_transport(self.ctx.kv.tensor_transport())
        return info

    async def prefill(self, req: EngineRequest, key: str) -> PrefillReply:
        out = await self.engine.prefill_export(req)
        task = asyncio.create_task(self._publish(key, out))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        return {"first_token": out.first_token, "num_tokens": out.num_tokens, "server": out.server}

    async def _publish(self, key: str, out: Prefilled) -> None:
        ctx = self.ctx
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool,
                lambda: publish(
                    self.directory,
                    key,
                    out.layers,
                    out.num_tokens,
                    ctx.kv,
                    run_id=ctx.run_id,
                    cell_id=ctx.cell_id,
                    tensor_transport=ctx.kv.tensor_transport(),
                ),
            )
        except Exception as e:  # the receiver learns why instead of waiting for its timeout
            await self.directory.fail.remote(key, reason_of(e))

    async def shutdown(self) -> None:
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
        putter.close()
        await self.engine.shutdown()


class ObjectStoreDecode:
    own_stats_prefix = ""

    def __init__(self, ctx: PairContext):
        self.ctx = ctx
        self.engine = _kv_engine(ctx.engine)
        self.directory: Any = None
        self.kv_bytes_per_token: int | None = None
        self._pool = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="pdbench-kv-get")

    async def start(self) -> EngineInfo:
        info = await self.engine.start()
        self.kv_bytes_per_token = info.kv_bytes_per_token
        self.directory = find_directory(self.ctx.directory)
        start_tensor_transport(self.ctx.kv.tensor_transport())
        return info

    def overlaps_prefill(self, req: EngineRequest) -> bool:
        return False

    def _receive(self, h: Handoff, reply: PrefillReply) -> tuple[TransferRecord, Any]:
        ident = h.ident()
        num_tokens = reply["num_tokens"]
        try:
            state, dsts = self.engine.import_kv(num_tokens, num_tokens + h.req.max_tokens)
        except Exception as e:
            self.directory.drop.remote(h.key)
            return TransferRecord(**ident, error=f"import: {reason_of(e)}"), None
        del ident["key"]
        inject = CopyInto(dsts, self.ctx.kv.host_copy_threads)
        rec = receive(self.directory, h.key, inject, self.ctx.kv, **ident, kv_bytes_per_token=self.kv_bytes_per_token)
        return rec, state

    async def decode(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        p = await h.prefilled
        if p.reply is not None:
            rec, state = await asyncio.get_running_loop().run_in_executor(self._pool, self._receive, h, p.reply)
        else:
            rec, state = TransferRecord(**h.ident(), error=p.failure), None
        ready = time.monotonic()
        h.outcome = Outcome(rec.row(), rec.ok, ready - p.at if p.reply is not None else None)
        if rec.ok:
            assert p.reply is not None and p.reply["first_token"] is not None
            stream = self.engine.generate_injected(h.req, p.reply["first_token"], state)
        else:  # recompute: the local engine's own queue and prefill times stand
            stream = self.engine.generate(h.req)
        h.submitted = time.monotonic()
        async for delta in stream:
            yield delta

    async def shutdown(self) -> None:
        await self.engine.shutdown()


SIDES = Sides(prefill=ObjectStorePrefill, decode=ObjectStoreDecode)
