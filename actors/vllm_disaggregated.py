"""vLLM prefill and decode actors: the same pair as actors/disaggregated.py, with the KV moved by
`RayObjectStoreConnector` inside the engines instead of by the actors.

The prefill actor runs the prompt with max_tokens=1 and producer params: after vLLM's step that
computed the prompt, the connector (in vLLM's worker process) publishes the prompt's full KV
blocks under the request's key in a thread of its own, while the first token already returns.
The decode actor then submits the whole request with consumer params: the request waits in the
decode engine while the connector receives those blocks (following the sender group by group),
vLLM computes the remaining tail of the prompt (< one block + 1 token) and produces the first
token itself, and the connector hands its transfer record to the directory, where this actor
collects it. A failed load ends the attempt in vLLM and this actor runs the request again
without a transfer; the record says why.

TTFT breakdown (each part measured in one process): queue and prefill from the prefill engine's
own stats; transfer = the time the decode engine held the request for its KV (`kv_wait_s`: the
step that started the load → KV injected, decode worker's clock); first decode = the rest of the
time from the prefill's reply to the first token on this actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.decode_entry import DecodeEntry
from actors.engine_actor import node_facts
from actors.engines import EngineConfig, EngineRequest
from actors.engines.models import arch_kv_bytes_per_token, architecture, resolve_model
from actors.engines.vllm_engine import VllmEngine
from actors.kv.accounting import TransferRecord
from actors.kv.blocks import CONSUMER, PRODUCER, transferable_tokens
from actors.kv.directory import find_directory
from actors.kv.spec import KVTransferConfig
from actors.kv.transport import reason_of

_REPORT_TIMEOUT_S = 30.0


def connector_config(
    cfg: EngineConfig, kv: KVTransferConfig, directory: str, run_id: str, cell_id: str, role: str = "decode"
) -> dict[str, Any]:
    raw, _ = resolve_model(cfg.model)
    return {
        "kv_connector": "RayObjectStoreConnector",
        "kv_connector_module_path": "actors.kv.vllm_connector",
        "kv_role": "kv_both",
        # A failed load ends the request in vLLM (its default, said out loud), and the decode actor
        # runs it again as a fresh request (`stream_or_recompute`). vLLM 0.26's own "recompute"
        # policy gave a token sequence shifted by one on 2x H200 (vllm-project/vllm#49250).
        "kv_load_failure_policy": "fail",
        "kv_connector_extra_config": {
            "directory": directory,
            # vLLM's worker runs in a process of its own, outside Ray: it joins the cluster itself.
            "ray_address": ray.get_runtime_context().gcs_address,
            "run_id": run_id,
            "cell_id": cell_id,
            "engine_label": f"{cell_id}/{role}",
            # The decode engine receives: it registers the object store with CUDA at start-up.
            "receiver": role == "decode",
            "kv_transfer": kv.model_dump(),
            "kv_bytes_per_token": arch_kv_bytes_per_token(architecture(raw), cfg.dtype) if raw else None,
        },
    }


def _engine(cfg: EngineConfig, kv: KVTransferConfig, directory: str, run_id: str, cell_id: str, producer: bool) -> VllmEngine:
    if cfg.kind != "vllm":
        raise ValueError(f"engine.kind: the vLLM disaggregated pair needs 'vllm', got {cfg.kind!r}")
    role = "prefill" if producer else "decode"
    return VllmEngine(cfg, kv_transfer_config=connector_config(cfg, kv, directory, run_id, cell_id, role))


async def stream_or_recompute(engine: Any, req: EngineRequest, params: dict[str, Any] | None, retried: list[str]) -> AsyncIterator[Any]:
    """The decode engine's deltas for `req`; if vLLM ends it with an error before its first token
    (what a failed KV load does under policy "fail"; an abort is not retried), the same request
    again as a fresh one without a transfer (a full prefill on this engine, as aggregated), and
    its reason appended to `retried`."""
    n, failed = 0, None
    async for delta in engine.generate(req, kv_transfer_params=params):
        if params is not None and n == 0 and delta.finished and delta.finish_reason == "error" and not delta.token_ids:
            failed = delta.error
            break
        n += len(delta.token_ids)
        yield delta
    if failed is None:
        return
    retried.append(failed)
    again = EngineRequest(f"{req.request_id}:recompute", req.prompt_token_ids, req.max_tokens)
    async for delta in engine.generate(again):
        yield delta


@ray.remote
class VllmPrefillActor:
    def __init__(self, engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], directory: str, run_id: str, cell_id: str):
        self.engine = _engine(
            EngineConfig.model_validate(engine_cfg), KVTransferConfig.model_validate(kv_cfg), directory, run_id, cell_id, True
        )
        self.directory_name = directory
        self.directory: Any = None

    async def start(self) -> dict[str, Any]:
        info = await self.engine.start()
        self.directory = find_directory(self.directory_name)
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "prefill"}

    async def prefill(self, request: dict[str, Any], key: str) -> dict[str, Any]:
        """Run the prompt (max_tokens=1); its KV is being published under `key` when this returns.

        `published` is None: the connector publishes off the engine step, so the outcome is not
        known yet; a failed publish reaches the decode side through the directory (its load fails
        and the request is recomputed there)."""
        req = EngineRequest(**request)
        one = EngineRequest(f"{req.request_id}:prefill", req.prompt_token_ids, 1)
        first, server = None, None
        async for d in self.engine.generate(one, kv_transfer_params={"pdbench_role": PRODUCER, "key": key}):
            first = d.token_ids[0] if d.token_ids and first is None else first
            if d.finished:
                server = d.server
        return {
            "first_token": first,
            "num_tokens": len(req.prompt_token_ids),
            "server": server or {},
            "published": None,
            "publish_error": None,
        }

    async def shutdown(self) -> None:
        await self.engine.shutdown()


@ray.remote
class VllmDecodeActor(DecodeEntry):
    def __init__(self, engine_cfg: dict[str, Any], kv_cfg: dict[str, Any], prefill: Any, directory: str, run_id: str, cell_id: str):
        self.cfg = EngineConfig.model_validate(engine_cfg)
        self.kv = KVTransferConfig.model_validate(kv_cfg)
        self.engine = _engine(self.cfg, self.kv, directory, run_id, cell_id, False)
        self.prefill = prefill
        self.directory_name = directory
        self.run_id, self.cell_id = run_id, cell_id
        self.directory: Any = None
        self.block_size = 16
        self._records: list[dict[str, Any]] = []

    async def start(self) -> dict[str, Any]:
        info = await self.engine.start()
        self.block_size = int(info.extra["vllm_memory"]["block_size"])
        self.directory = find_directory(self.directory_name)
        return {**dataclasses.asdict(info), "node": node_facts(), "role": "decode"}

    def transfers(self) -> list[dict[str, Any]]:
        rows, self._records = self._records, []
        return rows

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = EngineRequest(**request)
        expected = transferable_tokens(len(req.prompt_token_ids), self.block_size)
        if self.kv.decode_submit == "after_prefill" or not expected:
            async for delta in super()._generate(request):
                yield delta
            return
        async for delta in self._decode_with_prefill(req, expected):
            yield delta

    async def _prefill_or_fail(self, request: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str | None, float]:
        """The prefill actor's reply, or the reason it failed; a failure is told to the directory at
        once, so the load already waiting for `key` in the decode engine fails now, not at its
        timeout (and the request is recomputed there)."""
        try:
            reply = await self.prefill.prefill.remote(request, key)
            if reply["first_token"] is None:
                raise RuntimeError("the prefill engine returned no token")
            return reply, None, time.monotonic()
        except Exception as e:
            failure = f"prefill: {reason_of(e)}"
            await self.directory.fail.remote(key, failure)
            return None, failure, time.monotonic()

    async def _decode_with_prefill(self, req: EngineRequest, expected: int) -> AsyncIterator[dict[str, Any]]:
        """kv_transfer.decode_submit 'with_prefill': the consumer request enters the decode engine
        at once and waits there for its KV while the prefill runs; the connector follows the sender
        group by group. TTFT breakdown: queue and prefill from the prefill engine; transfer = the
        part of the KV's arrival after the prefill's reply (KV injected − reply, the decode worker's
        and this actor's CLOCK_MONOTONIC on one host: the engine runs beside this actor); first
        decode = the rest up to the first token."""
        t0 = time.monotonic()
        key = f"{req.request_id}/{secrets.token_hex(6)}"
        ident = {"run_id": self.run_id, "cell_id": self.cell_id, "request_id": req.request_id, "key": key}
        prefill = asyncio.ensure_future(self._prefill_or_fail(dataclasses.asdict(req), key))
        offset = time.monotonic() - t0
        t_first = None
        retried: list[str] = []
        async for delta in stream_or_recompute(self.engine, req, {"pdbench_role": CONSUMER, "key": key}, retried):
            now = time.monotonic()
            t_first = t_first or now
            delta.token_s = [s + offset for s in delta.token_s]
            if delta.finished:
                reply, failure, t_reply = await prefill
                rec = await self._record(ident, key, expected, None)
                own = delta.server or {}
                ok = bool(rec.get("ok")) and not retried
                if ok and reply is not None:
                    server = {k: reply["server"].get(k) for k in ("server_queue_s", "prefill_s")}
                    injected = rec.get("injected_mono") or t_reply
                    server["transfer_s"] = max(0.0, injected - t_reply)
                    server["first_decode_s"] = t_first - max(t_reply, injected)
                else:  # recomputed here: this engine's own queue and prefill stand, as in aggregated
                    server = {k: own.get(k) for k in ("server_queue_s", "prefill_s", "first_decode_s")}
                    server["transfer_s"] = rec.get("total_s")
                delta.server = {
                    **{f"decode_{k}": v for k, v in own.items()},
                    **server,
                    "kv_wait_s": rec.get("kv_wait_s"),
                    "server_e2e_s": now - t0,
                    "kv_transfer_ok": ok,
                }
                if retried:
                    delta.server["decode_retry_reason"] = retried[0]
                elif failure:
                    delta.server["decode_retry_reason"] = failure
            yield dataclasses.asdict(delta)

    async def _decode(
        self, request: dict[str, Any], key: str, reply: dict[str, Any] | None, failure: str | None, t0: float
    ) -> AsyncIterator[dict[str, Any]]:
        req = EngineRequest(**request)
        ident = {"run_id": self.run_id, "cell_id": self.cell_id, "request_id": req.request_id, "key": key}
        t_reply = time.monotonic()
        expected = transferable_tokens(len(req.prompt_token_ids), self.block_size) if reply else 0
        if reply is not None and expected and reply["published"] is False:
            # Known before the decode engine sees the request: recompute cleanly, record why.
            failure = f"prefill side: {reply['publish_error']}"
            self.directory.drop.remote(key)
        params = {"pdbench_role": CONSUMER, "key": key} if expected and failure is None else None
        server: dict[str, Any] = {}
        if reply is not None:
            server = {k: reply["server"].get(k) for k in ("server_queue_s", "prefill_s")}
        offset = t_reply - t0
        t_first = None
        retried: list[str] = []
        async for delta in stream_or_recompute(self.engine, req, params, retried):
            now = time.monotonic()
            t_first = t_first or now
            delta.token_s = [s + offset for s in delta.token_s]
            if delta.finished:
                rec = await self._record(ident, key, expected, failure)
                own = delta.server or {}
                if rec.get("ok") and not retried:
                    # transfer: how long the decode engine held the request for its KV (the step
                    # that started the load → last layer injected, decode worker's clock); first
                    # decode: the rest of reply → first token, here.
                    server["transfer_s"] = rec.get("kv_wait_s") if rec.get("kv_wait_s") is not None else rec.get("total_s")
                    server["first_decode_s"] = (t_first - t_reply) - (server["transfer_s"] or 0.0)
                else:  # recomputed here: this engine's own queue and prefill stand, as in aggregated
                    server = {k: own.get(k) for k in ("server_queue_s", "prefill_s", "first_decode_s")}
                    server["transfer_s"] = rec.get("total_s")  # time lost inside the engine, if it got that far
                decode_stats = {f"decode_{k}": v for k, v in own.items()}
                ok = bool(rec.get("ok")) and not retried
                delta.server = {**decode_stats, **server, "server_e2e_s": now - t0, "kv_transfer_ok": ok}
                if retried:
                    delta.server["decode_retry_reason"] = retried[0]
            yield dataclasses.asdict(delta)

    async def _record(self, ident: dict[str, Any], key: str, expected: int, failure: str | None) -> dict[str, Any]:
        if failure is not None:
            row = TransferRecord(**ident, error=failure).row()
        elif not expected:
            row = TransferRecord(**ident, tokens=0, status="none", error="prompt shorter than one block + 1: nothing to move").row()
        else:
            row = (
                await self.directory.take_report.remote(key, _REPORT_TIMEOUT_S)
                or TransferRecord(**ident, error=f"no transfer record from the connector within {_REPORT_TIMEOUT_S:g} s").row()
            )
        self._records.append(row)
        return row

    async def shutdown(self) -> None:
        await self.engine.shutdown()
