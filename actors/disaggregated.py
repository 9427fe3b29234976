"""Prefill and decode actors: one request's prefill on one engine, its decode on another.

The decode actor is the pair's entry and streams `generate` exactly like EngineActor, so the load
generator cannot tell the modes apart. Per request it asks the prefill actor for the prompt
(which returns the first token as soon as its prefill is done and publishes the KV in the
background, layer group by layer group), pulls the KV through the object store into a fresh
sequence state, and lets its own engine continue from there. If the KV does not arrive (prefill
actor dead, object lost, timeout) it recomputes the prefill itself: the request completes and
the transfer is recorded as failed, with the reason.

TTFT breakdown of a disaggregated request, each part measured in the process where it happens:
queue and prefill on the prefill engine; transfer on the decode actor, from the prefill's reply
to the KV injected; first decode from then to the decode engine releasing the first token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from actors.decode_entry import DecodeEntry
from actors.engine_actor import node_facts
from actors.engines import EngineConfig, EngineRequest, build_engine
from actors.engines.batching import BatchingEngine, Prefilled
from actors.kv.accounting import TransferRecord
from actors.kv.directory import find_directory
from actors.kv.spec import KVTransferConfig
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


@ray.remote
class PrefillActor:
    def __init__(self, engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], directory: str, run_id: str, cell_id: str):
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.kv = KVTransferConfig.model_validate(kv_cfg)
        if self.kv.decode_submit != "after_prefill":
            raise ValueError("kv_transfer.decode_submit: the reference pair moves the KV after the prefill; use 'after_prefill'")
        self.engine = _kv_engine(self.cfg)
        self.directory_name = directory
        self.run_id, self.cell_id = run_id, cell_id
        self.directory: Any = None
        self._publishing: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="pdbench-kv-put")

    async def start(self) -> dict[str, Any]:
        info = await self.engine.start()
        self.directory = find_directory(self.directory_name)
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "prefill"}

    async def prefill(self, request: dict[str, Any], key: str) -> dict[str, Any]:
        """Run the prompt; publish its KV under `key` in the background; return the first token."""
        out = await self.engine.prefill_export(EngineRequest(**request))
        task = asyncio.create_task(self._publish(key, out))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        return {"first_token": out.first_token, "num_tokens": out.num_tokens, "server": out.server}

    async def _publish(self, key: str, out: Prefilled) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool,
                lambda: publish(self.directory, key, out.layers, out.num_tokens, self.kv, run_id=self.run_id, cell_id=self.cell_id),
            )
        except Exception as e:  # the receiver learns why instead of waiting for its timeout
            await self.directory.fail.remote(key, reason_of(e))

    async def shutdown(self) -> None:
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
        await self.engine.shutdown()


@ray.remote
class DecodeActor(DecodeEntry):
    def __init__(
        self,
        engine_cfg: dict[str, Any],
        kv_cfg: dict[str, Any],
        prefill: Any,
        directory: str,
        run_id: str,
        cell_id: str,
    ):
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.kv = KVTransferConfig.model_validate(kv_cfg)
        self.engine = _kv_engine(self.cfg)
        self.prefill = prefill
        self.directory_name = directory
        self.run_id, self.cell_id = run_id, cell_id
        self.directory: Any = None
        self.kv_bytes_per_token: int | None = None
        self._records: list[TransferRecord] = []
        self._pool = ThreadPoolExecutor(_TRANSFER_THREADS, thread_name_prefix="pdbench-kv-get")

    async def start(self) -> dict[str, Any]:
        info = await self.engine.start()
        self.kv_bytes_per_token = info.kv_bytes_per_token
        self.directory = find_directory(self.directory_name)
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "decode"}

    def transfers(self) -> list[dict[str, Any]]:
        """The transfer records so far, handed over once (the cell collects them at its end)."""
        rows = [r.row() for r in self._records]
        self._records.clear()
        return rows

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    # ------------------------------------------------------------------------------------------
    def _receive(self, req: EngineRequest, key: str, reply: dict[str, Any]) -> tuple[TransferRecord, Any]:
        ident: dict[str, Any] = {"run_id": self.run_id, "cell_id": self.cell_id, "request_id": req.request_id}
        try:
            state, dsts = self.engine.import_kv(reply["num_tokens"], reply["num_tokens"] + req.max_tokens)
        except Exception as e:
            self.directory.drop.remote(key)
            return TransferRecord(**ident, key=key, error=f"import: {reason_of(e)}"), None
        rec = receive(
            self.directory, key, CopyInto(dsts, self.kv.host_copy_threads), self.kv, **ident, kv_bytes_per_token=self.kv_bytes_per_token
        )
        return rec, state

    async def _decode(
        self, request: dict[str, Any], key: str, reply: dict[str, Any] | None, failure: str | None, t0: float
    ) -> AsyncIterator[dict[str, Any]]:
        req = EngineRequest(**request)
        t_reply = time.monotonic()
        if reply is not None:
            rec, state = await asyncio.get_running_loop().run_in_executor(self._pool, self._receive, req, key, reply)
        else:
            rec, state = TransferRecord(self.run_id, self.cell_id, req.request_id, key, error=failure), None
        t_ready = time.monotonic()
        self._records.append(rec)
        if rec.ok:
            assert reply is not None
            stream = self.engine.generate_injected(req, reply["first_token"], state)
            server = {k: reply["server"].get(k) for k in ("server_queue_s", "prefill_s")}
        else:  # recompute: the local engine's own queue and prefill times stand
            stream = self.engine.generate(req)
            server = {}
        server["transfer_s"] = t_ready - t_reply if reply is not None else None
        offset = time.monotonic() - t0
        first = True
        async for delta in stream:
            now = time.monotonic()
            if first and rec.ok:
                server["first_decode_s"] = now - t_ready
            first = False
            delta.token_s = [s + offset for s in delta.token_s]
            if delta.finished:
                delta.server = {**(delta.server or {}), **server, "server_e2e_s": now - t0, "kv_transfer_ok": rec.ok}
            yield dataclasses.asdict(delta)
