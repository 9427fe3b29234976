"""vLLM engine adapter: `AsyncLLM` built inside the engine actor, streaming token deltas.

Architecture-only models (configs/models/*.json, or any config with no weights beside it) run
with `load_format="dummy"` and token-id prompts (`skip_tokenizer_init`): shapes, memory, compute
and KV sizes are real, weights are random but seeded, so two engines built alike hold the same
weights. A hub name or a folder with weights loads normally, tokenizer included.

vLLM's own per-request stats (`disable_log_stats=False`) are recorded beside the client's
timestamps: they come from the EngineCore process's monotonic clock, so only differences between
them are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from actors.engines.base import EngineAdapter, EngineInfo, EngineRequest, MemoryReport, TokenDelta
from actors.engines.models import arch_kv_bytes_per_token, architecture, architecture_hash, resolve_model
from actors.engines.spec import EngineConfig

WORKER_EXTENSION = "actors.engines.vllm_worker_ext.PdbenchWorkerExtension"


def engine_args(cfg: EngineConfig, model_dir: str, dummy: bool, kv_transfer_config: dict | None = None) -> dict[str, Any]:
    """The AsyncEngineArgs pdbench uses; `engine.vllm` in the config overrides any of them."""
    args: dict[str, Any] = {
        "model": model_dir,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_batch_size,
        "seed": cfg.weight_seed,
        "enable_prefix_caching": False,  # a benchmark must not silently reuse earlier prompts' KV
        "disable_log_stats": False,  # per-request queued/scheduled/first/last token stats
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if dummy:
        args.update(load_format="dummy", skip_tokenizer_init=True)
    if getattr(cfg, "hf_overrides", None):
        args["hf_overrides"] = dict(cfg.hf_overrides)
    if kv_transfer_config is not None:
        args["kv_transfer_config"] = kv_transfer_config
    args.update(cfg.vllm)
    return args


def scheduler_settings(sched: Any) -> dict[str, Any]:
    """The scheduler budget vLLM resolved: its defaults depend on how an engine is started (per-step
    tokens: 2048 for AsyncLLM from engine args, as here, but 8192 under `vllm serve` on a >= 70 GiB
    GPU), so a comparison with another server reads the values here, not the arguments."""
    return {
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_num_seqs": sched.max_num_seqs,
        "enable_chunked_prefill": sched.enable_chunked_prefill,
        "async_scheduling": getattr(sched, "async_scheduling", None),
    }


def memory_report(raw: dict[str, Any]) -> MemoryReport:
    """weights and activation peak as vLLM's profiler measured them; KV = the allocated block
    pool; other = non-torch memory (CUDA context, NCCL/cuBLAS workspaces) + CUDA graphs."""
    other = raw["non_torch_bytes"] + raw["cudagraph_bytes"]
    parts = (raw["weights_bytes"], raw["kv_cache_bytes"], raw["activation_peak_bytes"], other)
    return MemoryReport(
        source="vLLM start-up profiler (determine_available_memory) + KV tensors + torch.cuda + NVML",
        measured=True,
        device=raw.get("device", "cuda"),
        weights_bytes=raw["weights_bytes"],
        kv_cache_bytes=raw["kv_cache_bytes"],
        activation_peak_bytes=raw["activation_peak_bytes"],
        other_bytes=other,
        total_bytes=sum(parts),
        device_total_bytes=raw["device_total_bytes"],
        kv_cache_tokens=raw["num_gpu_blocks"] * raw["block_size"] if raw.get("num_gpu_blocks") else None,
        detail=raw,
    )


def materialise(arch: dict[str, Any]) -> str:
    """vLLM reads a model folder: write the architecture config into one named by its content.

    Engines built alike must name the same folder: vLLM's NixlConnector hashes the model path into
    the compatibility check of its handshake, so a private folder per engine made every NIXL
    transfer between two pdbench engines fail. The write is atomic (a file renamed into place), so
    engines starting at once on one node never read half a config."""
    text = json.dumps(arch, indent=1, sort_keys=True)
    d = Path(tempfile.gettempdir()) / "pdbench-models" / hashlib.sha256(text.encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "config.json").is_file():
        with tempfile.NamedTemporaryFile("w", dir=d, suffix=".part", delete=False) as f:
            f.write(text)
        os.replace(f.name, d / "config.json")
    return str(d)


class VllmEngine(EngineAdapter):
    def __init__(self, cfg: EngineConfig, kv_transfer_config: dict | None = None):
        if cfg.kind != "vllm":
            raise ValueError(f"VllmEngine needs engine.kind 'vllm', got {cfg.kind!r}")
        self.cfg = cfg
        self.kv_transfer_config = kv_transfer_config
        self.llm: Any = None
        self.info_: EngineInfo | None = None

    async def start(self) -> EngineInfo:
        # vLLM 0.26 imports FlashInfer for its sampler unless told not to; FlashInfer is optional.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not torch.cuda.is_available():
            raise RuntimeError("engine.kind 'vllm' needs a CUDA GPU; this actor sees none")
        raw, weights = resolve_model(self.cfg.model)
        dummy = weights is None
        if weights is None:
            assert raw is not None, "resolve_model gives an architecture wherever it gives no weights"
            model_dir = materialise(raw)
        else:
            model_dir = weights
        t0 = time.monotonic()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(self.cfg, model_dir, dummy, self.kv_transfer_config)))
        init_s = time.monotonic() - t0
        hf = self.llm.model_config.hf_config.to_dict()
        # The architecture as run: engine.hf_overrides (e.g. YaRN) included, as vLLM applies them.
        arch = architecture({**raw, **self.cfg.hf_overrides} if raw is not None else hf)
        mem = await self.memory()
        checksum = (await self.llm.collective_rpc("pdbench_weight_checksum"))[0]
        self.info_ = EngineInfo(
            engine="vllm",
            model=self.cfg.model,
            architecture={**arch, "hash": architecture_hash(arch)},
            vocab_size=int(hf.get("vocab_size") or arch["vocab_size"]),
            kv_bytes_per_token=arch_kv_bytes_per_token(arch, self.cfg.dtype),
            device=torch.cuda.get_device_name(0),
            dtype=self.cfg.dtype,
            random_weights=dummy,
            extra={
                "load_format": "dummy" if dummy else "auto",
                "engine_init_s": init_s,
                "vllm_memory": mem["detail"],
                "weight_checksum": checksum,
                "engine_args": {k: v for k, v in engine_args(self.cfg, model_dir, dummy).items() if k != "model"},
                "scheduler": scheduler_settings(self.llm.vllm_config.scheduler_config),
            },
        )
        return self.info_

    def sampling_params(self, request: EngineRequest, kv_transfer_params: dict | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=0.0,
            ignore_eos=True,  # fixed output lengths: the workload, not the random weights, decides
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def generate(self, request: EngineRequest, kv_transfer_params: dict | None = None) -> AsyncIterator[TokenDelta]:
        from vllm.inputs import TokensPrompt

        assert self.llm is not None, "engine not started"
        t_q = time.monotonic()
        n = 0
        stream = self.llm.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
            self.sampling_params(request, kv_transfer_params),
            request.request_id,
        )
        async for out in stream:
            now = time.monotonic()
            toks = list(out.outputs[0].token_ids)
            n += len(toks)
            delta = TokenDelta(token_ids=toks, token_s=[now - t_q] * len(toks), finished=out.finished)
            if out.finished:
                delta.server = self._server_stats(out, t_q, now)
                delta.finish_reason = out.outputs[0].finish_reason
                delta.error = self.finish_error(delta.finish_reason, n, request.max_tokens)
            yield delta

    @staticmethod
    def finish_error(reason: str | None, tokens: int, max_tokens: int) -> str | None:
        """Why a finished request failed, or None. vLLM ends a request it could not serve (a KV
        load that failed under kv_load_failure_policy "fail", an abort) as finished, with what it
        produced so far: such a request must not count as a success. With ignore_eos, "length"
        is the only normal end."""
        if reason == "length" and tokens == max_tokens:
            return None
        return f"vLLM finished the request with reason {reason!r} after {tokens} of {max_tokens} tokens"

    @staticmethod
    def _server_stats(out: Any, t_q: float, now: float) -> dict[str, Any]:
        """vLLM's stats, differences of the EngineCore's own clock only."""
        m = out.metrics
        stats: dict[str, Any] = {"server_e2e_s": now - t_q, "transfer_s": None, "first_decode_s": 0.0}
        if m is not None and m.scheduled_ts and m.queued_ts:
            stats.update(
                server_queue_s=m.scheduled_ts - m.queued_ts,
                # The first token comes out of the prefill step itself in an aggregated engine.
                prefill_s=m.first_token_ts - m.scheduled_ts,
                vllm_first_token_latency_s=m.first_token_latency,
                vllm_decode_s=m.last_token_ts - m.first_token_ts,
                vllm_generation_tokens=m.num_generation_tokens,
            )
        stats["vllm_num_cached_tokens"] = out.num_cached_tokens
        if getattr(out, "kv_transfer_params", None) is not None:  # a KV connector's handshake (NIXL: where the blocks wait)
            stats["kv_transfer_params"] = dict(out.kv_transfer_params)
        return stats

    async def memory(self) -> dict[str, Any]:
        """MemoryReport fields from vLLM's own start-up profiler; its raw numbers under `detail`."""
        assert self.llm is not None, "engine not started"
        raw = (await self.llm.collective_rpc("pdbench_memory"))[0]
        return dataclasses.asdict(memory_report(raw))

    async def reset(self) -> None:
        """Empty the prefix cache (on only where engine.vllm enables it): a later cell must not
        find an earlier cell's prompts cached. vLLM refuses while requests hold blocks."""
        assert self.llm is not None, "engine not started"
        if await self.llm.reset_prefix_cache() is False:  # releases that return nothing reset or raise
            raise RuntimeError("vLLM could not reset its prefix cache (requests still hold KV blocks)")

    async def shutdown(self) -> None:
        if self.llm is not None:
            # An AsyncLLM left running keeps its EngineCore process, and the actor, alive.
            self.llm.shutdown()
            self.llm = None
