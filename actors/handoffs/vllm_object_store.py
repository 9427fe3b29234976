"""vLLM engines, KV through Ray's object store: `RayObjectStoreConnector` moves it inside the engines.

The prefill side runs the prompt with max_tokens=1 and producer params: after vLLM's step that
computed the prompt, the connector (in vLLM's worker process) publishes the prompt's full KV
blocks under the request's key in a thread of its own, while the first token already returns.
The decode side submits the whole request with consumer params: the request waits in the decode
engine while the connector receives those blocks (following the sender group by group), vLLM
computes the remaining tail of the prompt (< one block + 1 token) and produces the first token
itself, and the connector hands its transfer record to the directory, where the decode side
collects it. A failed load ends the attempt in vLLM and the decode side runs the request again
without a transfer (`stream_or_recompute`); the record says why.

Transfer time is how long the decode engine held the request for its KV (`kv_wait_s`: the step
that started the load → KV injected, decode worker's clock). With `kv_transfer.decode_submit:
with_prefill` the request enters the decode engine beside the prefill call, and transfer time is
the part of the KV's arrival after the prefill's reply (KV injected − reply, the decode worker's
and the actor's CLOCK_MONOTONIC on one host: the engine runs beside the actor).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.engines import EngineConfig, EngineInfo, EngineRequest, TokenDelta
from actors.engines.models import arch_kv_bytes_per_token, architecture, resolve_model
from actors.engines.vllm_engine import VllmEngine
from actors.handoffs.base import Handoff, Outcome, PairContext, PrefillReply, Sides
from actors.handoffs.spec import KVHandoffConfig
from actors.kv.accounting import TransferRecord
from actors.kv.blocks import CONSUMER, PRODUCER, transferable_tokens
from actors.kv.directory import find_directory
from actors.kv.spec import KVTransferConfig

_REPORT_TIMEOUT_S = 30.0


def connector_config(
    cfg: EngineConfig, kv: KVTransferConfig, directory: str, run_id: str, cell_id: str, role: str = "decode"
) -> dict[str, Any]:
    raw, _ = resolve_model(cfg.model)
    transport = kv.transport() if isinstance(kv, KVHandoffConfig) else kv
    return {
        "kv_connector": "RayObjectStoreConnector",
        "kv_connector_module_path": "actors.kv.vllm_connector",
        "kv_role": "kv_both",
        # A failed load ends the request in vLLM (its default, said out loud), and the decode side
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
            "kv_transfer": transport.model_dump(),
            # Ray Direct Transport instead of object-store bytes (backend ray-rdt-nixl), or None.
            "tensor_transport": kv.tensor_transport() if isinstance(kv, KVHandoffConfig) else None,
            "kv_bytes_per_token": arch_kv_bytes_per_token(architecture(raw), cfg.dtype) if raw else None,
        },
    }


def _engine(ctx: PairContext, role: str) -> VllmEngine:
    if ctx.engine.kind != "vllm":
        raise ValueError(f"engine.kind: the vLLM disaggregated pair needs 'vllm', got {ctx.engine.kind!r}")
    return VllmEngine(ctx.engine, kv_transfer_config=connector_config(ctx.engine, ctx.kv, ctx.directory, ctx.run_id, ctx.cell_id, role))


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


class VllmObjectStorePrefill:
    def __init__(self, ctx: PairContext):
        self.ctx = ctx
        self.engine = _engine(ctx, "prefill")

    async def start(self) -> EngineInfo:
        info = await self.engine.start()
        find_directory(self.ctx.directory)  # the connector publishes there: it must exist before the first prompt
        return info

    async def prefill(self, req: EngineRequest, key: str) -> PrefillReply:
        """Run the prompt (max_tokens=1); its KV is being published under `key` when this returns.

        `published` is None: the connector publishes off the engine step, so the outcome is not
        known yet; a failed publish reaches the decode side through the directory (its load fails
        and the request is recomputed there)."""
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


class VllmObjectStoreDecode:
    own_stats_prefix = "decode_"

    def __init__(self, ctx: PairContext):
        self.ctx = ctx
        self.engine: Any = _engine(ctx, "decode")
        self.directory: Any = None
        self.block_size = 16

    async def start(self) -> EngineInfo:
        info = await self.engine.start()
        self.block_size = int(info.extra["vllm_memory"]["block_size"])
        self.directory = find_directory(self.ctx.directory)
        return info

    def overlaps_prefill(self, req: EngineRequest) -> bool:
        """kv_transfer.decode_submit 'with_prefill': the consumer request enters the decode engine
        at once and waits there for its KV while the prefill runs (its decode blocks held meanwhile)."""
        return self.ctx.kv.decode_submit == "with_prefill" and bool(transferable_tokens(len(req.prompt_token_ids), self.block_size))

    def decode(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        return self._with_prefill(h) if self.overlaps_prefill(h.req) else self._after_prefill(h)

    async def _after_prefill(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        p = await h.prefilled
        failure = p.failure
        expected = transferable_tokens(len(h.req.prompt_token_ids), self.block_size) if p.reply else 0
        if p.reply is not None and expected and p.reply.get("published") is False:
            # Known before the decode engine sees the request: recompute cleanly, record why.
            failure = f"prefill side: {p.reply.get('publish_error')}"
            self.directory.drop.remote(h.key)
        params = {"pdbench_role": CONSUMER, "key": h.key} if expected and failure is None else None
        retried: list[str] = []
        h.submitted = time.monotonic()
        async for delta in stream_or_recompute(self.engine, h.req, params, retried):
            if delta.finished:
                rec = await self._record(h, expected, failure)
                ok = bool(rec.get("ok")) and not retried
                # ok: how long the decode engine held the request for its KV; else the time lost
                # inside the engine, if it got that far
                transfer_s = rec.get("kv_wait_s") if ok and rec.get("kv_wait_s") is not None else rec.get("total_s")
                h.outcome = Outcome(rec, ok, transfer_s, retried[0] if retried else None)
            yield delta

    async def _with_prefill(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        expected = transferable_tokens(len(h.req.prompt_token_ids), self.block_size)
        retried: list[str] = []
        h.submitted = time.monotonic()
        async for delta in stream_or_recompute(self.engine, h.req, {"pdbench_role": CONSUMER, "key": h.key}, retried):
            if delta.finished:
                p = await h.prefilled
                rec = await self._record(h, expected, None)
                ok = bool(rec.get("ok")) and not retried
                injected = rec.get("injected_mono") or p.at
                transfer_s = max(0.0, injected - p.at) if ok else rec.get("total_s")
                reason = retried[0] if retried else p.failure
                h.outcome = Outcome(rec, ok, transfer_s, reason, extra={"kv_wait_s": rec.get("kv_wait_s")})
            yield delta

    async def _record(self, h: Handoff, expected: int, failure: str | None) -> dict[str, Any]:
        if failure is not None:
            return TransferRecord(**h.ident(), error=failure).row()
        if not expected:
            return TransferRecord(**h.ident(), tokens=0, status="none", error="prompt shorter than one block + 1: nothing to move").row()
        report: dict[str, Any] | None = await self.directory.take_report.remote(h.key, _REPORT_TIMEOUT_S)
        return report or TransferRecord(**h.ident(), error=f"no transfer record from the connector within {_REPORT_TIMEOUT_S:g} s").row()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


SIDES = Sides(prefill=VllmObjectStorePrefill, decode=VllmObjectStoreDecode)
