"""The Ray object store's shared-memory mapping, registered with CUDA so a GPU copies straight out
of an object's pages.

Why: a received layer group lives in plasma, which is pageable memory to the GPU; a copy from it
goes through the driver's small bounce buffers (159 ms for 1.21 GB on an H200 host) or through
pdbench's own pinned staging (a CPU copy first). Plasma is one `MAP_SHARED` mapping per client
process, made once for the whole store (`object_store_memory`) and never unmapped; registering
that range once with `cudaHostRegister` (what vLLM does for its own shared-memory offload region)
turns every later copy from any object in it into a DMA (21.8 ms for the same bytes). Objects the
store had to place outside it (fallback allocations when full) are not covered: `covers` says so
and the caller stages them instead.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("pdbench.plasma")

# Registering or prefaulting commits (and, registered, pins) that much host memory: a store left at
# Ray's default size (30% of RAM) is refused, and the caller says so; size it explicitly
# (PDBENCH_OBJECT_STORE_GB, or `ray start --object-store-memory`).
MAX_PREPARED_BYTES = 32 << 30


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str

    def covers(self, ptr: int, nbytes: int) -> bool:
        return self.start <= ptr and ptr + nbytes <= self.end


def mapping_of(ptr: int, maps: str | None = None) -> Mapping | None:
    """The shared mapping of /proc/self/maps that holds address `ptr` (None if it is not shared)."""
    if maps is None:
        with open("/proc/self/maps") as f:
            maps = f.read()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and "s" in fields[1]:
            return Mapping(lo, hi, fields[5].strip() if len(fields) > 5 else "")
    return None


def store_mapping() -> Mapping | None:
    """Find this process's plasma mapping: put a small object, get it back, look up its address."""
    import ray

    ref = ray.put(np.zeros(1 << 20, dtype=np.uint8))
    view = ray.get(ref)
    m = mapping_of(view.ctypes.data)
    del view, ref
    return m


class Registration:
    """The plasma mapping registered with CUDA in this process (once; `registered()` hands it out)."""

    def __init__(self, mapping: Mapping):
        import torch

        self.mapping = mapping
        t0 = time.perf_counter()
        rc = torch.cuda.cudart().cudaHostRegister(mapping.start, mapping.end - mapping.start, 0)
        code = getattr(rc, "value", rc)
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of the object store's mapping failed (code {code})")
        self.seconds = time.perf_counter() - t0
        gib = (mapping.end - mapping.start) / 2**30
        log.info("pdbench: registered plasma %s (%.1f GiB) with CUDA in %.2f s", mapping.path, gib, self.seconds)

    def covers(self, ptr: int, nbytes: int) -> bool:
        return self.mapping.covers(ptr, nbytes)


_REG: Registration | None = None
_REG_ERROR: str | None = None
_LOCK = threading.Lock()


def registered() -> Registration | None:
    """This process's registration of the store, made on first call; None (with the reason logged
    once) where it cannot be made, and receivers stage instead."""
    global _REG, _REG_ERROR
    with _LOCK:
        if _REG is None and _REG_ERROR is None:
            try:
                m = store_mapping()
                if m is None:
                    raise RuntimeError("no shared mapping holds a plasma object")
                if m.end - m.start > MAX_PREPARED_BYTES:
                    raise RuntimeError(
                        f"the object store is {(m.end - m.start) / 2**30:.0f} GiB; "
                        f"size it (PDBENCH_OBJECT_STORE_GB) to at most {MAX_PREPARED_BYTES >> 30} GiB"
                    )
                _REG = Registration(m)
            except Exception as e:  # staged copies still work, only slower: say so once
                _REG_ERROR = f"{type(e).__name__}: {e}"
                log.warning("pdbench: object store not registered with CUDA (%s); receivers stage through pinned buffers", _REG_ERROR)
        return _REG


def registration_error() -> str | None:
    return _REG_ERROR


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, contents untouched


def prefault(mapping: Mapping | None = None) -> float | None:
    """Map every page of the store into this process's page tables once, writable.

    Why: plasma is one shared mapping, but each client process takes a page fault the first time
    it touches each 4 KiB page of it; a sender whose puts land on pages it never touched pays
    those faults inside `ray.put` (a 1.2 GB put took 90–140 ms instead of ~25 ms on an H200 host
    until the store had been cycled through). MADV_POPULATE_WRITE does it up front without
    changing a byte. Returns the seconds it took, or None where the kernel cannot."""
    import ctypes

    m = mapping or store_mapping()
    if m is None or m.end - m.start > MAX_PREPARED_BYTES:
        log.warning("pdbench: object store not prefaulted (%s)", "no mapping" if m is None else "larger than MAX_PREPARED_BYTES")
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    t0 = time.perf_counter()
    if libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.end - m.start), _MADV_POPULATE_WRITE) != 0:
        log.warning("pdbench: could not prefault the object store (errno %d)", ctypes.get_errno())
        return None
    return time.perf_counter() - t0
