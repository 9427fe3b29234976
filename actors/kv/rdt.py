"""Ray Direct Transport (NIXL) for the KV transport: one agent, one registered pool per device.

The bytes of a layer group stay on the sender's device; `ray.put(..., _tensor_transport="nixl")`
puts their NIXL descriptors into the object store and the receiver's `ray.get` reads them with
NIXL. Three things Ray 2.60 leaves to the caller, each learnt on 2x H200:
- the NIXL agent is built lazily without a lock, so threads that put or get at once each built
  one (`start_tensor_transport` builds it up front, on one thread);
- without a pool every put registers its buffer with NIXL and every free deregisters it, which
  changes the agent's metadata while receivers read other buffers of the same agent, and with the
  caching allocator a new buffer may sit where a deregistered one was. Every 8K-token transfer
  (19 groups) failed that way or some related way ("The NIXL transfer failed"), unverified which;
  a pool registered once (`register_nixl_memory_pool`) keeps the registrations fixed: a put copies
  the group into it (a device-local copy), and the block returns when the object is freed;
- before registering, Ray synchronises the whole device unless given a stream: the engine's
  forward pass would hold every put;
- a receiver that only names a target device gets a buffer allocated, registered with NIXL and
  deregistered again for every get; `ReceiveBuffers` registers each receive buffer once and reuses
  it (benchmarks/rdt_nixl.py: 3.3x faster reads over host memory on the CPU box; on one H200 the
  reads ran at 0.5 GB/s either way, a transport limit of that machine, not the registrations).
A NIXL agent's UCX progress thread keeps one core busy for as long as its process lives (3.0 CPU-s
per 3 s idle on the CI box): probes run in one-call tasks, and tests never start one in their own
process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

_lock = threading.Lock()
_pools: set[torch.device] = set()
_streams: dict[torch.device, Any] = {}
_FULL_POLL_S = 0.002


def start_tensor_transport(name: str | None) -> None:
    """Build Ray's NIXL agent now, on the calling thread, before transfers run in many threads."""
    if name == "nixl":
        from ray.experimental.rdt.util import get_tensor_transport_manager

        manager: Any = get_tensor_transport_manager("NIXL")  # its NIXL class; the declared type is the base
        manager.get_nixl_agent()


def _prepare(device: torch.device, pool_bytes: int) -> Any:
    """This process's pool on `device` (one per process: Ray keeps one) and, on a GPU, the stream
    its copies run on; created once."""
    with _lock:
        if device not in _pools:
            from ray.experimental import register_nixl_memory_pool, set_nixl_cuda_stream

            if _pools:
                raise RuntimeError(f"Ray keeps one NIXL pool per process: it is on {next(iter(_pools))}, not {device}")
            register_nixl_memory_pool(pool_bytes, device)
            _pools.add(device)
            if device.type == "cuda":
                _streams[device] = torch.cuda.Stream(device)
                set_nixl_cuda_stream(_streams[device])
        return _streams.get(device)


def _pool_full(e: BaseException) -> bool:
    return type(e).__name__ == "NixlOutOfMemoryError" or "memory pool out of memory" in str(e)


def put(buf: torch.Tensor, pool_bytes: int, deadline: float) -> Any:
    """`ray.put` of one packed group by NIXL, through the pool; waits (until the monotonic
    `deadline`) while the pool is full, since receivers free blocks as they take their groups."""
    stream = _prepare(buf.device, pool_bytes)
    while True:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                ref = ray.put(buf, _tensor_transport="nixl")
            if stream is not None:
                stream.synchronize()  # the copy into the pool is done before anyone can read it
            return ref
        except Exception as e:
            if not _pool_full(e) or time.monotonic() > deadline:
                raise
            time.sleep(_FULL_POLL_S)


def _normal(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


_alloc_streams: dict[torch.device, Any] = {}
_alloc_lock = threading.Lock()


def fresh_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    """A new receive buffer, allocated on a CUDA stream of its own. PyTorch's caching allocator hands
    a block out again as soon as it was freed on its stream, while kernels queued there (the
    engine's, in the decode engine's process) may still write it: work on that stream runs after
    them, NIXL's write does not, so a late kernel could overwrite the KV it landed (likeliest cause
    of three checksum mismatches on 2x H200, docs/evidence/e3b-vllm-qwen3-8b-2xh200-repeat, each in
    a buffer just made). A block is reused only on the stream it belongs to; this one runs nothing
    and its buffers are never freed, so its blocks carry no pending work, and nothing waits for the
    engine's."""
    if device.type != "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    with _alloc_lock:
        if device not in _alloc_streams:
            _alloc_streams[device] = torch.cuda.Stream(device)
        stream = _alloc_streams[device]
    with torch.cuda.stream(stream):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


class ReceiveBuffers:
    """Receive buffers registered with NIXL once, reused for later reads of the same size.

    A buffer goes back with the event after which nothing reads it any more (None: nothing
    does now) and is handed out again once that event has completed. Buffers are made when none
    is free and kept for the process's life, so they number the most groups ever in flight at
    once; registered memory must never be freed (Ray's registration cache is keyed by address).
    New buffers come from `make` (`fresh_buffer`).
    """

    def __init__(self, make: Callable[[torch.device, int], torch.Tensor] = fresh_buffer) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._free: dict[tuple[torch.device, int], list[tuple[Any, torch.Tensor]]] = {}
        self._count = 0

    def take(self, device: torch.device, nbytes: int) -> torch.Tensor:
        device = _normal(device)
        with self._lock:
            free = self._free.get((device, nbytes), [])
            for i, (done, buf) in enumerate(free):
                if done is None or done.query():
                    del free[i]
                    return buf
            self._count += 1
        from ray.experimental import register_nixl_memory

        buf = self._make(device, nbytes)
        register_nixl_memory(buf)
        return buf

    def give(self, buf: torch.Tensor, done: Any) -> None:
        with self._lock:
            self._free.setdefault((buf.device, buf.numel()), []).append((done, buf))

    def count(self) -> int:
        """Buffers made so far (registered with NIXL)."""
        return self._count


RECEIVE = ReceiveBuffers()
