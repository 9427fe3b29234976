"""Host buffers for the KV transport: reused packing buffers on the sending side, and a pinned,
double-buffered host→device copier on the receiving side.

Why the receiver needs one: a received layer lives in the object store's shared memory, which is
pageable. A plain `tensor.to("cuda")` from pageable memory goes through the driver's own small
staging buffers, one copy at a time: on an H200 host, 1.2 GB of Qwen3-8B KV took 188 ms that
way, against 22 ms for a pinned copy. `HostToDevice` copies each chunk into one of two pinned
buffers with several threads, then lets the GPU copy engine take it asynchronously while the
threads fill the other buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class Staging:
    """Host buffers that packing reuses: `ray.put` copies out of them, so a buffer is free again as
    soon as put returns. Reuse spares page faults (fresh pages cost more than the copy into them:
    packing 1 GiB into new buffers ran at 2 GB/s, into reused ones at memcpy speed) and, for GPUs,
    pinned allocations (a fresh pinned buffer costs milliseconds). A GPU sender fills one buffer
    while the other is put, and the vLLM connector runs up to `kv_transfer.worker_threads` senders
    at once: eight buffers per kind are kept (the largest seen). `allocate` and `drop` make and
    release a buffer of another kind (the putter's shared segments, actors/kv/putter.py)."""

    KEPT = 8

    def __init__(
        self,
        allocate: Callable[[int, bool], torch.Tensor] | None = None,
        drop: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self._free: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        self._lock = threading.Lock()
        self._allocate = allocate or (lambda nbytes, pinned: torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned))
        self._drop = drop

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._lock:
            free = self._free[pinned]
            for i, buf in enumerate(free):
                if buf.numel() >= nbytes:
                    return free.pop(i)
        return self._allocate(nbytes, pinned)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        with self._lock:
            free = self._free[pinned]
            free.append(buf)
            free.sort(key=lambda b: b.numel(), reverse=True)
            dropped = free[self.KEPT :]
            del free[self.KEPT :]
        if self._drop is not None:
            for b in dropped:
                self._drop(b)


STAGING = Staging()


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (same memory)."""
    return t.reshape(-1).view(torch.uint8)


def parallel_copy(dst: torch.Tensor, src: torch.Tensor, pool: ThreadPoolExecutor | None, parts: int) -> None:
    """Copy flat uint8 `src` into `dst` in `parts` slices on `pool`'s threads (torch releases the
    GIL while it copies; one thread reads shared memory at a fraction of the host's bandwidth)."""
    n = src.numel()
    if dst.numel() != n:
        raise ValueError(f"copy of {n} bytes into {dst.numel()}")
    if pool is None or parts <= 1 or n < parts << 20:  # under 1 MiB a slice, threads cost more
        dst.copy_(src)
        return
    step = -(-n // parts)
    spans = [(a, min(a + step, n)) for a in range(0, n, step)]

    def part(span: tuple[int, int]) -> None:
        # Inference mode is per thread: buffers made under vLLM's are inference tensors, which
        # only code in inference mode may write.
        with torch.inference_mode():
            dst[span[0] : span[1]].copy_(src[span[0] : span[1]])

    list(pool.map(part, spans))


class HostToDevice:
    """Pageable host tensors → one GPU, at pinned-memory speed, asynchronously on its own stream.

    `upload` returns a new device tensor whose copy is queued on `stream`; work that uses it (an
    index_copy_ into a paged cache) is queued on the same stream, and `synchronize` waits for all
    of it. One per (device, threads) per process (`host_to_device`): its pinned buffers are
    allocated once. Receivers that run at once in one process share it, chunk by chunk, so each
    one's `synchronize` (and inject_s) also waits for the others' copies queued before it.
    """

    def __init__(self, device: torch.device, chunk_bytes: int = 64 << 20, threads: int = 4):
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.threads = threads
        self.stream = torch.cuda.Stream(device)
        self._slots = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._done: list[Any] = [None, None]  # the event after each slot's last device copy
        self._next = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pdbench-h2d") if threads > 1 else None
        self._lock = threading.Lock()

    def begin(self, after: Any = None) -> None:
        """Order this stream after the engine's writes to the memory the upload will land in: the
        event `after` (recorded by the engine's thread on its stream), else the work already queued
        on this thread's current stream."""
        if after is not None:
            self.stream.wait_event(after)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def upload(self, src: torch.Tensor) -> torch.Tensor:
        src = src.contiguous()
        with torch.cuda.stream(self.stream):
            out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        s, d = byte_view(src), byte_view(out)
        for off in range(0, s.numel(), self.chunk_bytes):
            end = min(off + self.chunk_bytes, s.numel())
            with self._lock:
                i = self._next
                self._next ^= 1
                if self._done[i] is not None:
                    self._done[i].synchronize()  # its previous chunk has left for the GPU
                slot = self._slots[i][: end - off]
                parallel_copy(slot, s[off:end], self._pool, self.threads)
                with torch.cuda.stream(self.stream):
                    d[off:end].copy_(slot, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                self._done[i] = ev
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()


_UPLOADERS: dict[tuple[Any, int], HostToDevice] = {}
_UPLOADERS_LOCK = threading.Lock()


def host_to_device(device: torch.device, threads: int) -> HostToDevice:
    """The process's `HostToDevice` for `device` (created on first use)."""
    with _UPLOADERS_LOCK:
        key = (device, threads)
        if key not in _UPLOADERS:
            _UPLOADERS[key] = HostToDevice(device, threads=threads)
        return _UPLOADERS[key]
