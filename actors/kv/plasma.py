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
        log.info("pdbench: registered plasma %s (%.1f GiB) with CUDA in %.2f s", mapping.path, (mapping.end - mapping.start) / 2**30, self.seconds)

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
                _REG = Registration(m)
            except Exception as e:  # staged copies still work, only slower: say so once
                _REG_ERROR = f"{type(e).__name__}: {e}"
                log.warning("pdbench: object store not registered with CUDA (%s); receivers stage through pinned buffers", _REG_ERROR)
        return _REG


def registration_error() -> str | None:
    return _REG_ERROR
