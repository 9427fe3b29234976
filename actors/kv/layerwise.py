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

import itertools
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
    does, and `finish` (vLLM's wait_for_save, after the pass) gathers whatever is left.

    The engine's thread pays as little as it can: with the block index on dim 0, one gather per
    layer for all the step's saves (each save a slice of it), and a sender is woken only when the
    layer it waits for is in, not at every layer (each wake-up takes the GIL from the step loop)."""

    def __init__(self, caches: Sequence[torch.Tensor], dim: int, saves: Sequence[Transfer]):
        self.caches, self.dim = list(caches), dim
        device = self.caches[0].device

        # Allocated before the pass on the engine's stream; every use of them is ordered after it.
        def buffers(blocks: int) -> list[torch.Tensor]:
            return [torch.empty(_gathered_shape(kv, dim, blocks), dtype=kv.dtype, device=device) for kv in self.caches]

        if dim == 0:
            ids = [b for t in saves for b in t.block_ids]
            self._idx = [torch.tensor(ids, device=device, dtype=torch.long)]
            self._targets = [buffers(len(ids))]
            bounds = list(itertools.accumulate((len(t.block_ids) for t in saves), initial=0))
            self.outputs = [[buf[a:b] for buf in self._targets[0]] for a, b in itertools.pairwise(bounds)]
        else:  # a slice on dim 1 is strided: one gather per save into tensors of its own
            self._idx = [torch.tensor(t.block_ids, device=device, dtype=torch.long) for t in saves]
            self._targets = [buffers(len(t.block_ids)) for t in saves]
            self.outputs = self._targets
        self._events: list[Any] = []  # one per gathered layer (the event that covers it; None on CPU)
        self._queued: list[float] = []  # CLOCK_MONOTONIC when each layer's gather was queued
        self._waiters: list[tuple[int, threading.Event]] = []
        self._lock = threading.Lock()
        self._complete = threading.Event()  # the last layer's gather has run on the device
        self._complete_ts = 0.0

    def layer(self, index: int) -> None:
        """Gather layers up to `index` (vLLM's save_kv_layer for that layer: its KV is queued)."""
        start = len(self._events)
        if index < start:
            return
        end = min(index + 1, len(self.caches))
        for li in range(start, end):
            for idx, out in zip(self._idx, self._targets, strict=True):
                torch.index_select(self.caches[li], self.dim, idx, out=out[li])
        ev = None
        if self.caches[0].is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.caches[0].device))
        now = time.monotonic()
        with self._lock:
            self._events.extend([ev] * (end - start))
            self._queued.extend([now] * (end - start))
            due = [flag for n, flag in self._waiters if n <= end]
            self._waiters = [(n, flag) for n, flag in self._waiters if n > end]
        for flag in due:
            flag.set()
        if end == len(self.caches):
            self._stamp_completion(ev, now)

    def _stamp_completion(self, ev: Any, queued: float) -> None:
        """When the whole KV is ready: a thread of its own waits for the last event, so the stamp
        does not depend on when a busy sender gets to look (CPU: the gather ran when queued)."""

        def stamp() -> None:
            ev.synchronize()
            self._complete_ts = time.monotonic()
            self._complete.set()

        if ev is None:
            self._complete_ts = queued
            self._complete.set()
        else:
            threading.Thread(target=stamp, name="pdbench-kv-ready", daemon=True).start()

    def finish(self) -> None:
        """After the pass (vLLM's wait_for_save): whatever no hook gathered is gathered now."""
        self.layer(len(self.caches) - 1)

    def wait(self, end: int, timeout_s: float) -> float:
        """Block until layers [0, end) are gathered, on the device too; return when they were
        ready (CLOCK_MONOTONIC). Exact to a thread switch for the last layer, which is when the
        KV was ready; for earlier layers the time their gather was queued."""
        flag = threading.Event()
        with self._lock:
            if len(self._events) < end:
                self._waiters.append((end, flag))
            else:
                flag.set()
        if not flag.wait(timeout_s) or (end == len(self.caches) and not self._complete.wait(timeout_s)):
            raise LayerNotWritten(f"layer {end - 1} of the forward pass not written within {timeout_s:g} s")
        if end == len(self.caches):
            return self._complete_ts
        ev = self._events[end - 1]
        if ev is not None:
            ev.synchronize()
        return self._queued[end - 1]
