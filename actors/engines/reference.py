"""Reference engine: a transformers causal LM with a real, per-sequence KV cache.

Each sequence owns one preallocated KV buffer [layers, 2 (K, V), kv_heads, capacity, head_dim]. A decode step
left-pads the active sequences into one batch cache with an attention mask and explicit
positions, runs one forward pass, and writes each sequence's new K/V column back. Eager attention
keeps masked positions at exactly zero weight, so batched greedy output equals unbatched output.

For disaggregation a sequence's KV leaves as one view per layer ([2, kv_heads, n, head_dim], K and
V side by side, so the transport moves one tensor per layer) and enters a fresh state the same way.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from actors.engines import memory as mem
from actors.engines.base import EngineInfo, MemoryReport
from actors.engines.checksum import weight_checksum
from actors.engines.models import (
    arch_kv_bytes_per_token,
    architecture,
    architecture_hash,
    resolve_model,
)
from actors.engines.spec import EngineConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SeqKV:
    kv: torch.Tensor  # [layers, 2, kv_heads, capacity, head_dim]
    n: int  # filled positions

    @property
    def k(self) -> torch.Tensor:  # [layers, kv_heads, capacity, head_dim], a view
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]


def _device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but torch sees no CUDA GPU")
    return torch.device(cfg.device)


def load_causal_lm(cfg: EngineConfig) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """Build (random weights from a seed) or load (real weights) the model; return it, its config, its name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch_cfg, weights = resolve_model(cfg.model)
    dtype = _DTYPES[cfg.dtype]
    # engine.hf_overrides replace top-level config fields before the model is built, as vLLM's
    # hf_overrides do, so both engines run the same architecture (e.g. the same YaRN rope).
    if weights is not None:
        hf_config = AutoConfig.from_pretrained(weights, **cfg.hf_overrides)
        model = AutoModelForCausalLM.from_pretrained(weights, config=hf_config, dtype=dtype, attn_implementation="eager")
        return model, model.config.to_dict(), weights
    assert arch_cfg is not None
    arch_cfg = {**arch_cfg, **cfg.hf_overrides}
    hf_config = AutoConfig.for_model(**arch_cfg)
    torch.manual_seed(cfg.weight_seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
    return model, arch_cfg, cfg.model


class ReferenceModel:
    def __init__(self, cfg: EngineConfig):
        if cfg.kind != "reference":
            raise ValueError(f"ReferenceModel needs engine.kind 'reference', got {cfg.kind!r}")
        self.cfg = cfg
        self.device = _device(cfg)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        model, raw_cfg, name = load_causal_lm(cfg)
        self.model = model.to(self.device).eval()
        self.name = name
        self.random_weights = resolve_model(cfg.model)[1] is None
        self.arch = architecture(raw_cfg)
        c: Any = self.model.config  # a transformers config: its architecture fields are per-model attributes
        self.layers: int = c.num_hidden_layers
        self.kv_heads: int = c.num_key_value_heads
        self.head_dim: int = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.vocab_size: int = c.vocab_size
        self.dtype = _DTYPES[cfg.dtype]
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both releases.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._init_memory_accounting()

    # --- memory ----------------------------------------------------------------------------
    def _init_memory_accounting(self) -> None:
        """Baselines taken once the model is loaded: what serving adds is measured from here."""
        self._kv_lock = threading.Lock()
        self._kv_live = 0
        self._kv_peak = 0
        self._weights = mem.tensor_bytes([*self.model.parameters(), *self.model.buffers()])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._allocated_after_load = torch.cuda.memory_allocated(self.device)
            self._peak_reset = True
        else:
            self._rss_after_load = mem.rss_bytes()[0]
            self._peak_reset = mem.reset_peak_rss()

    def reset(self) -> None:
        """New peak windows: the next cell's memory() reports its own KV and activation peaks, not
        an earlier cell's on the same engine (the baselines taken after load stand). No prefix
        cache to clear: every prefill computes its prompt afresh."""
        with self._kv_lock:
            self._kv_peak = self._kv_live
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak_reset = mem.reset_peak_rss()

    def _kv_alloc(self, state: SeqKV) -> None:
        """Count a sequence's KV buffer until the buffer itself is freed: views of it handed to
        the KV transport keep it alive after the sequence is gone, and keep it counted."""
        nbytes = state.kv.numel() * state.kv.element_size()
        with self._kv_lock:
            self._kv_live += nbytes
            self._kv_peak = max(self._kv_peak, self._kv_live)
        weakref.finalize(state.kv, self._kv_free, nbytes)

    def _kv_free(self, nbytes: int) -> None:
        with self._kv_lock:
            self._kv_live -= nbytes

    def memory(self) -> MemoryReport:
        """Weights and KV are tensor bytes; activation and other come from the process's peak.

        CPU: peak RSS since load = post-load RSS + KV peak + activation peak, so activation is
        what the peak holds beyond the KV buffers; other is the post-load RSS beyond the weights
        (Python, torch, Ray). CUDA: activation = peak allocated − post-load allocated − KV peak;
        other = NVML's process memory (context, workspaces) + allocator slack beyond the rest.
        Activation and KV peaks need not coincide in time, so activation is an upper bound.
        """
        with self._kv_lock:
            kv_peak, kv_live = self._kv_peak, self._kv_live
        if self.device.type == "cuda":
            return self._memory_cuda(kv_peak, kv_live)
        rss_now, rss_peak = mem.rss_bytes()
        base = self._rss_after_load
        activation = max(0, rss_peak - base - kv_peak)
        other = max(0, base - self._weights)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        return MemoryReport(
            source="cpu: weights and KV as tensor bytes; activation and other from the process RSS "
            "(peak since load" + ("" if self._peak_reset else ", NOT reset after load: includes loading") + ")",
            measured=True,
            device="cpu",
            weights_bytes=self._weights,
            kv_cache_bytes=kv_peak,
            activation_peak_bytes=activation,
            other_bytes=other,
            total_bytes=self._weights + kv_peak + activation + other,
            device_total_bytes=ram,
            detail={
                "rss_after_load_bytes": base,
                "rss_peak_bytes": rss_peak,
                "rss_now_bytes": rss_now,
                "kv_live_bytes": kv_live,
                "peak_reset_after_load": self._peak_reset,
            },
        )

    def _memory_cuda(self, kv_peak: int, kv_live: int) -> MemoryReport:
        d = self.device
        torch.cuda.synchronize(d)
        props = torch.cuda.get_device_properties(d)
        allocated_peak = torch.cuda.max_memory_allocated(d)
        reserved_now, reserved_peak = torch.cuda.memory_reserved(d), torch.cuda.max_memory_reserved(d)
        activation = max(0, allocated_peak - self._allocated_after_load - kv_peak)
        process = mem.nvml_process_bytes(str(props.uuid))
        # What torch does not allocate (context, cuBLAS workspaces) stays roughly constant, so the
        # process's peak is torch's reserved peak plus today's non-torch share.
        non_torch = max(0, process - reserved_now) if process is not None else 0
        total = reserved_peak + non_torch
        other = max(0, total - self._weights - kv_peak - activation)
        return MemoryReport(
            source="cuda: weights and KV as tensor bytes; activation from torch.cuda peak allocated; "
            "other = torch reserved peak + non-torch process memory (NVML"
            + ("" if process is not None else ": unavailable, context not counted")
            + ") beyond the rest",
            measured=True,
            device=str(d),
            weights_bytes=self._weights,
            kv_cache_bytes=kv_peak,
            activation_peak_bytes=activation,
            other_bytes=other,
            total_bytes=self._weights + kv_peak + activation + other,
            device_total_bytes=int(props.total_memory),
            detail={
                "allocated_after_load_bytes": self._allocated_after_load,
                "allocated_peak_bytes": allocated_peak,
                "reserved_peak_bytes": reserved_peak,
                "reserved_now_bytes": reserved_now,
                "nvml_process_bytes": process,
                "kv_live_bytes": kv_live,
            },
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="reference",
            model=self.name,
            architecture={**self.arch, "hash": architecture_hash(self.arch)},
            vocab_size=self.vocab_size,
            kv_bytes_per_token=arch_kv_bytes_per_token(self.arch, self.cfg.dtype),
            device=str(self.device),
            dtype=self.cfg.dtype,
            extra={
                "num_parameters": sum(p.numel() for p in self.model.parameters()),
                "weight_checksum": weight_checksum(self.model.named_parameters()),
            },
            random_weights=self.random_weights,
        )

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, input_ids, cache, **kw):
        return self.model(input_ids=input_ids, use_cache=True, **{self._cache_kw: cache}, **kw)

    def new_state(self, capacity: int) -> SeqKV:
        shape = (self.layers, 2, self.kv_heads, capacity, self.head_dim)
        state = SeqKV(kv=torch.empty(shape, dtype=self.dtype, device=self.device), n=0)
        self._kv_alloc(state)
        return state

    def export_kv(self, state: SeqKV) -> list[torch.Tensor]:
        """The filled positions, one view [2, kv_heads, n, head_dim] per layer (no copy)."""
        return [state.kv[li, :, :, : state.n] for li in range(self.layers)]

    def import_kv(self, num_tokens: int, capacity: int) -> tuple[SeqKV, list[torch.Tensor]]:
        """A state holding `num_tokens` positions once the returned per-layer views are filled.

        The views have export_kv's shapes, so KV exported by one engine fills another's state.
        """
        if capacity > self.cfg.max_model_len:
            raise ValueError(f"prompt + max_tokens = {capacity} exceeds engine.max_model_len {self.cfg.max_model_len}")
        state = self.new_state(capacity)
        state.n = num_tokens
        return state, self.export_kv(state)

    @torch.inference_mode()
    def prefill(self, prompt_token_ids: list[int], capacity: int) -> tuple[int, SeqKV]:
        n = len(prompt_token_ids)
        if capacity > self.cfg.max_model_len:
            raise ValueError(f"prompt + max_tokens = {capacity} exceeds engine.max_model_len {self.cfg.max_model_len}")
        cache = self._new_cache()
        ids = torch.tensor([prompt_token_ids], device=self.device)
        out = self._forward(ids, cache)
        state = self.new_state(capacity)
        for li, layer in enumerate(cache.layers):
            state.k[li, :, :n] = layer.keys[0]
            state.v[li, :, :n] = layer.values[0]
        state.n = n
        return int(out.logits[0, -1].argmax()), state

    @torch.inference_mode()
    def decode(self, states: list[SeqKV], last_tokens: list[int]) -> list[int]:
        b = len(states)
        width = max(s.n for s in states)
        shape = (self.layers, b, self.kv_heads, width, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        mask = torch.zeros(b, width + 1, dtype=torch.long, device=self.device)
        for i, s in enumerate(states):  # left padding: every sequence ends at column `width`
            k[:, i, :, width - s.n :] = s.k[:, :, : s.n]
            v[:, i, :, width - s.n :] = s.v[:, :, : s.n]
            mask[i, width - s.n :] = 1
        cache = self._new_cache()
        for li in range(self.layers):
            cache.update(k[li], v[li], li)
        pos = torch.tensor([[s.n] for s in states], device=self.device)
        ids = torch.tensor([[t] for t in last_tokens], device=self.device)
        out = self._forward(ids, cache, attention_mask=mask, position_ids=pos)
        for li, layer in enumerate(cache.layers):
            new_k, new_v = layer.keys[:, :, -1], layer.values[:, :, -1]  # [b, kv_heads, head_dim]
            for i, s in enumerate(states):
                s.k[li, :, s.n] = new_k[i]
                s.v[li, :, s.n] = new_v[i]
        for s in states:
            s.n += 1
        return out.logits[:, -1].argmax(-1).tolist()
