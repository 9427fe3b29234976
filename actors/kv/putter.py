"""Layer groups written into the object store by a process of their own (`kv_transfer.put_process`).

Why: `ray.put` writes an object's bytes while it holds the GIL (benchmarks/put_gil.py), so a sender
inside the engine's process stalls the engine's step loop, which needs the GIL for every kernel it
launches, for as long as each copy takes. Here the sender's staging buffers are shared-memory
segments that the engine's process and one "putter" actor on the same node both map: the sender
copies a group into a segment (on a GPU the device→host DMA lands there directly: the engine's
process registers each segment with CUDA once) and asks the putter for it; the putter writes the
bytes into the object store under its own GIL. The engine's process only submits the call and waits
for its reply without the GIL.

Ownership: Ray 2.56 removed `ray.put(_owner=...)` (Ray 2.60 raises on it). An actor task's return
value, though, is owned by the caller: the putter returns the segment's bytes as the value of its
task, so every group's object is owned by the engine's process exactly as its own `ray.put` would
be, and lives and dies with it as before. A putter that dies loses no object it already returned
(the store keeps it for its owner); the engine's next put raises, and that transfer fails with the
reason. The putter is an actor the engine's process created (not detached): it dies with it, and
`close` kills it when the engine shuts down. A return under Ray's `max_direct_call_object_size`
(100 KiB) travels inline in the task's reply rather than through the store, so the bytes of a tiny
group do pass the engine's process (as a message, not a GIL-held copy of the group).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.kv.staging import Staging

log = logging.getLogger("pdbench.putter")

_SHM_DIR = "/dev/shm"
_PAGE = mmap.PAGESIZE


class Putter:
    """The actor: maps the engine's segments and returns their bytes as its tasks' values."""

    def __init__(self) -> None:
        self._maps: dict[int, mmap.mmap] = {}
        self.puts = 0

    def attach(self, seg: int, path: str, size: int) -> int:
        """Map segment `seg` (the engine unlinks its file once this returned); the putter's pid."""
        with open(path, "r+b") as f:
            self._maps[seg] = mmap.mmap(f.fileno(), size)
        return os.getpid()

    def detach(self, seg: int) -> None:
        self._maps.pop(seg, None)  # unmapped once the last view of it is gone

    @ray.method(num_returns=2)
    def put(self, seg: int, nbytes: int) -> tuple[int, np.ndarray]:
        """(the putter's pid, the segment's first `nbytes`): Ray copies the second into the object
        store after this returns and before the caller hears back, so the caller may refill the
        segment once the first value arrived."""
        self.puts += 1
        return os.getpid(), np.frombuffer(self._maps[seg], dtype=np.uint8, count=nbytes)

    def prefault(self) -> float | None:
        """Fault the store's pages into this process once (actors/kv/plasma.py: a put onto pages its
        process never touched pays the faults inside the put)."""
        from actors.kv import plasma

        return plasma.prefault()

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "puts": self.puts, "segments": len(self._maps)}


@dataclass
class _Segment:
    id: int
    tensor: torch.Tensor
    pinned: bool  # asked for (a GPU sender's buffer)
    registered: bool  # pinned with cudaHostRegister (False where CUDA refused: a pageable copy, slower)


class PutterClient:
    """One process's putter and its shared segments: `take`/`give` reuse them through a `Staging`
    pool (actors/kv/staging.py; fresh pages and CUDA registrations cost more than the copy), and
    `put` hands a packed one to the putter."""

    def __init__(self, max_concurrency: int) -> None:
        ctx = ray.get_runtime_context()
        self.worker_id = ctx.get_worker_id()
        strategy = NodeAffinitySchedulingStrategy(node_id=ctx.get_node_id(), soft=False)
        actor = ray.remote(Putter).options(num_cpus=0, max_concurrency=max_concurrency, scheduling_strategy=strategy)
        self.actor: Any = actor.remote()
        self.pid: int | None = None
        self._segments: dict[int, _Segment] = {}  # every live segment, by its address
        self._next = 0
        self._lock = threading.Lock()
        self._refused: str | None = None
        self._pool = Staging(self._create, self._drop)

    def prefault(self) -> float | None:
        """The putter's `prefault` (seconds, None where it could not): at start-up, before a put waits for it."""
        return ray.get(self.actor.prefault.remote())

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        return self._pool.take(nbytes, pinned)

    def give(self, buf: torch.Tensor, pinned: bool) -> None:
        self._pool.give(buf, pinned)

    def _create(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._lock:
            seg_id, self._next = self._next, self._next + 1
        size = -(-nbytes // _PAGE) * _PAGE
        path = os.path.join(_SHM_DIR, f"pdbench-kv-{os.getpid()}-{seg_id}")
        try:
            with open(path, "wb") as f:
                # Allocated now: a segment larger than what /dev/shm has left fails here, not as a
                # SIGBUS when the copy into it reaches the missing pages.
                os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise RuntimeError(
                f"kv_transfer.put_process: {_SHM_DIR} cannot hold a {size >> 20} MiB put segment ({e.strerror}); "
                "give it more room (docker --shm-size) or turn kv_transfer.put_process off"
            ) from e
        try:
            tensor = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            self.pid = ray.get(self.actor.attach.remote(seg_id, path, size))
        finally:
            os.unlink(path)  # both processes map it: nothing is left in /dev/shm if either dies
        seg = _Segment(seg_id, tensor, pinned, pinned and self._register(tensor))
        with self._lock:
            self._segments[tensor.data_ptr()] = seg
        return tensor

    def _register(self, tensor: torch.Tensor) -> bool:
        """Pin the segment for DMA, as actors/kv/plasma.py pins the store's mapping; a refusal is
        reported once and leaves a pageable buffer (the device→host copy still works, synchronously)."""
        rc = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), 0)
        code = getattr(rc, "value", rc)
        if code != 0 and self._refused is None:
            self._refused = f"cudaHostRegister of a {tensor.numel() >> 20} MiB put segment failed (code {code})"
            log.warning("pdbench: %s; device-to-host copies into it are pageable", self._refused)
        return code == 0

    def _drop(self, tensor: torch.Tensor) -> None:
        with self._lock:
            seg = self._segments.pop(tensor.data_ptr())
        if seg.registered:
            torch.cuda.cudart().cudaHostUnregister(seg.tensor.data_ptr())
        self.actor.detach.remote(seg.id)

    def put(self, buf: torch.Tensor) -> ray.ObjectRef:
        """`buf` (the first bytes of a segment `take` handed out) as an object owned by this process,
        written by the putter; returns once the bytes are in the store (the segment is free again)."""
        seg = self._segments[buf.data_ptr()]
        pid, ref = self.actor.put.remote(seg.id, buf.numel())
        ray.get(pid)  # raises if the putter died; waits without the GIL
        return ref

    def close(self) -> None:
        with self._lock:
            segs, self._segments = list(self._segments.values()), {}
        for seg in segs:
            if seg.registered:
                torch.cuda.cudart().cudaHostUnregister(seg.tensor.data_ptr())
        ray.kill(self.actor, no_restart=True)


_CLIENT: PutterClient | None = None
_LOCK = threading.Lock()


def client(max_concurrency: int) -> PutterClient:
    """This process's putter, started on first use (again after a new `ray.init`: the old one went
    with its cluster)."""
    global _CLIENT
    with _LOCK:
        if _CLIENT is None or _CLIENT.worker_id != ray.get_runtime_context().get_worker_id():
            _CLIENT = PutterClient(max_concurrency)
        return _CLIENT


def close() -> None:
    """Kill this process's putter (the engine is shutting down; no sender is running)."""
    global _CLIENT
    with _LOCK:
        c, _CLIENT = _CLIENT, None
    if c is not None and ray.is_initialized():
        c.close()
