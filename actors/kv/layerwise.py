"""A producer's KV gathered layer by layer while the forward pass writes it (`save: layerwise`).

vLLM calls the connector's `save_kv_layer` after each attention layer, on the engine's thread,
with that layer's work queued on the engine's stream. `LayerProgress.layer` only records an event
there and wakes the senders whose group of layers is now written; each sender (`SaveGather`, on
its own thread and CUDA stream) gathers its prompt's blocks of those layers after the event and
starts that group's device-to-host copy and put while the forward computes the layers after it.
When the pass ends, only the last group is left to move.

The step loop pays one event per layer and a wake-up per group, whatever the number of prompts
saved: the gathers, the block-id upload and the allocations all run on the senders' threads and
streams (a block-id upload from the engine's thread waits for everything the engine queued).

vLLM-free, so CPU tests drive it with CPU tensors (no events: on a CPU a layer is written when
`layer` is called).
"""

from __future__ import annotations

import contextlib
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


class LayerProgress:
    """How far one step's forward pass has written the KV: `layer(i)` on the engine's thread (vLLM's
    hook), `wait(end)` on a sender's. Layers arrive in model order; a layer whose hook did not run
    (a CUDA graph replay skips Python) counts as written with the next one that does, and `finish`
    (vLLM's wait_for_save, after the pass) marks whatever is left."""

    def __init__(self, caches: Sequence[torch.Tensor], dim: int, saves: Sequence[Transfer]):
        self.caches, self.dim, self.saves = list(caches), dim, list(saves)
        self._events: list[Any] = []  # one per written layer (the event that covers it; None on CPU)
        self._queued: list[float] = []  # CLOCK_MONOTONIC when each layer's event was recorded
        self._waiters: list[tuple[int, threading.Event]] = []
        self._lock = threading.Lock()
        self._complete = threading.Event()  # the last layer's KV is on the device
        self._complete_ts = 0.0

    def layer(self, index: int) -> None:
        """Layers up to `index` are queued on the engine's stream (vLLM's save_kv_layer)."""
        start = len(self._events)
        if index < start:
            return
        end = min(index + 1, len(self.caches))
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
        does not depend on when a busy sender gets to look."""

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
        """After the pass (vLLM's wait_for_save): whatever no hook marked is written now."""
        self.layer(len(self.caches) - 1)

    def wait(self, end: int, timeout_s: float) -> tuple[Any, float]:
        """Block until layers [0, end) are queued; return the event that covers them (None on CPU)
        and when they were ready: for the last layer, when its event completed (exact to a thread
        switch: the KV-ready time); for earlier ones, when their event was recorded."""
        flag = threading.Event()
        with self._lock:
            if len(self._events) < end:
                self._waiters.append((end, flag))
            else:
                flag.set()
        if not flag.wait(timeout_s) or (end == len(self.caches) and not self._complete.wait(timeout_s)):
            raise LayerNotWritten(f"layer {end - 1} of the forward pass not written within {timeout_s:g} s")
        return self._events[end - 1], (self._complete_ts if end == len(self.caches) else self._queued[end - 1])


class SaveGather:
    """One saved prompt's blocks of every layer, gathered on its sender's thread into tensors of
    their own, group by group as `progress` says the layers are written. Created on that thread:
    its block ids, buffers and gathers all go to a CUDA stream of its own."""

    def __init__(self, progress: LayerProgress, k: int):
        self.progress = progress
        t, caches, dim = progress.saves[k], progress.caches, progress.dim
        device = caches[0].device
        self.stream = torch.cuda.Stream(device) if caches[0].is_cuda else None
        with self._on_stream():
            self.idx = torch.tensor(t.block_ids, dtype=torch.long).to(device)
            self.layers = [torch.empty(_gathered_shape(kv, dim, len(t.block_ids)), dtype=kv.dtype, device=device) for kv in caches]
        self.gathered = 0

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def ready(self, end: int, timeout_s: float) -> float:
        """Layers [0, end) gathered and on the device; returns when the forward had written them."""
        ev, ts = self.progress.wait(end, timeout_s)
        with self._on_stream():
            if self.stream is not None and ev is not None:
                self.stream.wait_event(ev)
            for li in range(self.gathered, end):
                torch.index_select(self.progress.caches[li], self.progress.dim, self.idx, out=self.layers[li])
        if self.stream is not None:
            self.stream.synchronize()  # the copy out of these tensors runs on another stream
        self.gathered = end
        return ts
