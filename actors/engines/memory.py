"""Memory facts an engine process can measure about itself, for `EngineAdapter.memory()`.

On CPU there are no allocator statistics, so the resident set size (RSS) of the engine's own
process is the measurement: its high-water mark is reset once the model is loaded, so the peak
that `memory()` reports is the peak while serving. On CUDA, torch's allocator statistics give
allocated/reserved bytes and their peaks; NVML adds what torch cannot see (CUDA context,
cuBLAS/NCCL workspaces) as the process's device memory.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in bytes.

    Linux: VmRSS and VmHWM of /proc/self/status. Elsewhere: getrusage's lifetime peak for both
    (macOS reports bytes, Linux KiB).
    """
    now, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    if now is not None and peak is not None:
        return now * 1024, peak * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    b = maxrss if sys.platform == "darwin" else maxrss * 1024
    return b, b


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs).

    Returns whether it worked; where it did not, the peak includes model loading and says so.
    """
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by these tensors' elements (each tensor counted once, even if shared)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def nvml_process_bytes(gpu_uuid: str, pid: int | None = None) -> int | None:
    """Device memory NVML attributes to this process on the GPU with this UUID.

    By UUID, not index: inside a Ray actor CUDA_VISIBLE_DEVICES renumbers the GPUs torch sees,
    NVML does not. None where NVML cannot tell (no driver, hidden PIDs in a container).
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        uuid = gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        pid = os.getpid() if pid is None else pid
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
