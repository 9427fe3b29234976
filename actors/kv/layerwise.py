"""A producer's KV gathered layer by layer while the forward pass writes it (`save: layerwise`).

vLLM calls the connector's `save_kv_layer` after each attention layer, on the engine's thread,
with that layer's work queued on the engine's stream. `LayerwiseGather.layer` queues, right there,
the gather of every saved request's blocks of that layer into tensors of their own, then records
one event: the sender's thread waits for the event of a group's last layer and starts that
group's device-to-host copy and put while the forward computes the layers after it. When the pass
ends, only the last group is left to move.

One object per step that saves; vLLM-free, so CPU tests drive it with CPU tensors (no events:
on a CPU the gather has happened when `layer` returns).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from actors.kv.blocks import Transfer
from actors.kv.spec import KVTransferConfig


def layerwise_producer(extra_config: dict[str, Any] | None) -> bool:
    """Whether the engine with this connector extra config saves layer by layer: vLLM must then keep
    its CUDA graphs piecewise (a full graph's replay skips the per-layer Python hook)."""
    extra = extra_config or {}
    return not extra.get("receiver", False) and KVTransferConfig.model_validate(extra.get("kv_transfer", {})).save == "layerwise"


class LayerNotWritten(RuntimeError):
    """The forward pass never reached a layer the sender waited for (it failed, or it hung)."""


def _gathered_shape(kv: torch.Tensor, dim: int, blocks: int) -> list[int]:
    shape = list(kv.shape)
    shape[dim] = blocks
    return shape


class LayerwiseGather:
    """The saved requests of one step, each a list of per-layer tensors filled as layers complete.

    `layer(i)` runs on the engine's thread (vLLM's hook), `wait(end)` on a sender's: it returns
    once layers [0, end) are gathered, on the GPU too. Layers arrive in model order; a layer
    whose hook did not run (a CUDA graph replay skips Python) is gathered with the next one that
    does, and `finish` (vLLM's wait_for_save, after the pass) gathers whatever is left."""

    def __init__(self, caches: Sequence[torch.Tensor], dim: int, saves: Sequence[Transfer]):
        self.caches, self.dim = list(caches), dim
        device = self.caches[0].device
        self._idx = [torch.tensor(t.block_ids, device=device, dtype=torch.long) for t in saves]
        # Allocated before the pass on the engine's stream; every use of them is ordered after it.
        self.outputs = [
            [torch.empty(_gathered_shape(kv, dim, len(t.block_ids)), dtype=kv.dtype, device=device) for kv in self.caches] for t in saves
        ]
        self._events: list[Any] = []  # one per gathered layer (the event that covers it; None on CPU)
        self._cond = threading.Condition()
        self._queued: list[float] = []  # CLOCK_MONOTONIC when each layer's gather was queued

    def layer(self, index: int) -> None:
        """Gather layers up to `index` (vLLM's save_kv_layer for that layer: its KV is queued)."""
        start = len(self._events)
        if index < start:
            return
        end = min(index + 1, len(self.caches))
        for li in range(start, end):
            for idx, out in zip(self._idx, self.outputs, strict=True):
                torch.index_select(self.caches[li], self.dim, idx, out=out[li])
        ev = None
        if self.caches[0].is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.caches[0].device))
        now = time.monotonic()
        with self._cond:
            self._events.extend([ev] * (end - start))
            self._queued.extend([now] * (end - start))
            self._cond.notify_all()

    def finish(self) -> None:
        """After the pass (vLLM's wait_for_save): whatever no hook gathered is gathered now."""
        self.layer(len(self.caches) - 1)

    def wait(self, end: int, timeout_s: float) -> float:
        """Block until layers [0, end) are gathered; return when they were (CLOCK_MONOTONIC).

        On a GPU that is when the event completed if this thread saw it complete; if it had
        completed before the thread looked, the time its gather was queued, which is earlier: a
        KV-ready time is never later than the truth, so ready -> injected is never flattered."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._events) >= end, timeout_s):
                raise LayerNotWritten(f"layer {end - 1} of the forward pass not written within {timeout_s:g} s")
            ev, queued = self._events[end - 1], self._queued[end - 1]
        if ev is None or ev.query():
            return queued
        ev.synchronize()
        return time.monotonic()
