"""vLLM engines, KV through vLLM's own NixlConnector: vLLM moves it, pdbench measures from outside.

The handshake is the one of vLLM's disaggregated proxy (tests/v1/kv_connector/nixl_integration/
toy_proxy_server.py in vLLM 0.26): the prefill request carries kv_transfer_params
{"do_remote_decode": True} and max_tokens=1; vLLM keeps its KV blocks after the request finishes
and says in the output's kv_transfer_params where they wait (remote_engine_id, remote_block_ids,
remote_request_id, remote_host, remote_port, tp_size, ...). Those params go unchanged into the
decode request (they say do_remote_prefill), whose connector reads the blocks over NIXL (UCX: CUDA
IPC or NVLink between the GPUs of one host, RDMA or TCP across hosts) before vLLM computes the
prompt's last token and the first output token. Each engine's scheduler serves its NIXL metadata
on a ZMQ side channel at VLLM_NIXL_SIDE_CHANNEL_HOST:PORT, read from the environment of vLLM's
EngineCore process: the side sets both in its actor before the engine starts (the node's address,
a port free there), so pairs on one host never collide. Both engines must name one model path: the
handshake refuses a peer whose hash of model path, vLLM version, dtype and attention backend differs
(actors/engines/vllm_engine.py `materialise` gives engines built alike one folder).

What pdbench sees from outside: the prefill engine's queue and prefill times; on the decode
engine, vLLM's own clock from the request queued to it scheduled (the KV read, plus any wait
behind other requests: the transfer time), and the prompt tokens it did not compute
(`num_cached_tokens`; pdbench turns prefix caching off, so they are the moved KV). Bytes are
analytic (tokens × KV bytes per token) and the moved bytes left null: NIXL's own counts
(KVConnectorStats) reach only vLLM's stat loggers, summed per logging interval, never a request.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from actors.engines import EngineInfo, EngineRequest, TokenDelta
from actors.engines.vllm_engine import VllmEngine
from actors.handoffs.base import Handoff, Outcome, PairContext, PrefillReply, Sides
from actors.handoffs.vllm_object_store import stream_or_recompute
from actors.kv.accounting import TransferRecord

NAME = "nixl-vllm"
HOST_ENV, PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT"
# The prefill request's half of vLLM's handshake; the prefill engine fills in the remote_* fields.
PRODUCER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def refusal() -> str | None:
    """Why NIXL cannot move KV between vLLM engines here, or None: nixl and vLLM installed, a CUDA
    device visible, and a NIXL agent that can start UCX."""
    for module, what in (("nixl", "nixl (the nixl and nixl-cu13 wheels of the GPU kit)"), ("vllm", "vllm")):
        if importlib.util.find_spec(module) is None:
            return f"{NAME}: {what} is not installed on this node"
    try:
        import torch

        if not torch.cuda.is_available():
            return f"{NAME}: no CUDA device is visible to the engine"
        from nixl._api import nixl_agent, nixl_agent_config

        agent = nixl_agent(f"pdbench-probe-{os.getpid()}", nixl_agent_config(backends=[]))
        plugins = list(agent.get_plugin_list())
    except Exception as e:  # an import or agent start that fails says why in one line
        return f"{NAME}: NIXL does not start here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "UCX" not in plugins:
        return f"{NAME}: NIXL has no UCX transport plugin here (plugins: {', '.join(plugins) or 'none'})"
    return None


def side_channel(host: str) -> dict[str, str]:
    """One engine's side-channel environment: `host` and a port free on it now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return {HOST_ENV: host, PORT_ENV: str(port)}


def connector_config(ctx: PairContext, role: str) -> dict[str, Any]:
    """vLLM's kv_transfer_config for one engine of the pair (vLLM 0.26 deprecates kv_both for NIXL)."""
    return {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer" if role == "prefill" else "kv_consumer",
        "engine_id": f"{ctx.run_id}/{ctx.cell_id}/{role}",
        # A failed read ends the request in vLLM; the decode side runs it again without a transfer.
        "kv_load_failure_policy": "fail",
        "kv_connector_extra_config": {"backends": ["UCX"]},
    }


def _engine(ctx: PairContext, role: str) -> VllmEngine:
    if ctx.engine.kind != "vllm":
        raise ValueError(f"engine.kind: the {NAME} KV backend needs 'vllm', got {ctx.engine.kind!r}")
    return VllmEngine(ctx.engine, kv_transfer_config=connector_config(ctx, role))


def _start_env() -> None:
    """Set the side channel for the EngineCore process this actor is about to start."""
    import ray

    os.environ.update(side_channel(ray.util.get_node_ip_address()))


class NixlVllmPrefill:
    def __init__(self, ctx: PairContext):
        self.ctx = ctx
        self.engine: Any = _engine(ctx, "prefill")

    async def start(self) -> EngineInfo:
        _start_env()
        return await self.engine.start()

    async def prefill(self, req: EngineRequest, key: str) -> PrefillReply:
        """Run the prompt (max_tokens=1) as vLLM's remote-decode producer; the reply's server fields
        carry the output's kv_transfer_params, where the decode engine will read the blocks."""
        one = EngineRequest(f"{req.request_id}:prefill", req.prompt_token_ids, 1)
        first, server = None, None
        async for d in self.engine.generate(one, kv_transfer_params=dict(PRODUCER_PARAMS)):
            first = d.token_ids[0] if d.token_ids and first is None else first
            if d.finished:
                server = dict(d.server or {})
        server = server or {}
        params = server.pop("kv_transfer_params", None)
        return {
            "first_token": first,
            "num_tokens": len(req.prompt_token_ids),
            "server": {**server, "kv_transfer_params": params},
            "published": params is not None,
            "publish_error": None if params is not None else "the prefill engine returned no kv_transfer_params",
        }

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def record(h: Handoff, kv_bytes_per_token: int | None, own: dict[str, Any], failure: str | None) -> TransferRecord:
    """The transfers.parquet row of one handoff, from what the decode engine said about it: the
    stages NIXL runs inside vLLM stay null (bytes moved too), tokens are the ones vLLM did not compute."""
    if failure is not None:
        return TransferRecord(**h.ident(), error=failure)
    tokens = own.get("vllm_num_cached_tokens") or 0
    analytic = tokens * kv_bytes_per_token if kv_bytes_per_token else None
    if not tokens:
        return TransferRecord(**h.ident(), tokens=0, analytic_bytes=analytic, error="the decode engine computed the whole prompt itself")
    return TransferRecord(**h.ident(), tokens=tokens, analytic_bytes=analytic, ok=True, status="ok", kv_wait_s=own.get("server_queue_s"))


class NixlVllmDecode:
    own_stats_prefix = "decode_"

    def __init__(self, ctx: PairContext):
        self.ctx = ctx
        self.engine: Any = _engine(ctx, "decode")
        self.kv_bytes_per_token: int | None = None

    async def start(self) -> EngineInfo:
        _start_env()
        info = await self.engine.start()
        self.kv_bytes_per_token = info.kv_bytes_per_token
        return info

    def overlaps_prefill(self, req: EngineRequest) -> bool:
        """No: the decode request needs the prefill's block ids."""
        return False

    async def decode(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        p = await h.prefilled
        params = (p.reply or {}).get("server", {}).get("kv_transfer_params")
        failure = p.failure
        if failure is None and params is None:
            failure = f"prefill side: {(p.reply or {}).get('publish_error')}"
        retried: list[str] = []
        h.submitted = time.monotonic()
        async for delta in stream_or_recompute(self.engine, h.req, params if failure is None else None, retried):
            if delta.finished:
                rec = record(h, self.kv_bytes_per_token, delta.server or {}, failure or (retried[0] if retried else None))
                # ok: the decode engine's queued → scheduled (its clock): the read and any wait before it
                transfer_s = rec.kv_wait_s if rec.ok else None
                h.outcome = Outcome({**rec.row(), "bytes": None}, rec.ok, transfer_s, retried[0] if retried else None)
            yield delta

    async def shutdown(self) -> None:
        await self.engine.shutdown()


SIDES = Sides(prefill=NixlVllmPrefill, decode=NixlVllmDecode, available=refusal)
