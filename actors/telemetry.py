"""The NVML telemetry sampler: one zero-CPU actor per node, sampling for the whole run.

Rows carry wall-clock time (time.time()) because they are joined to cells by their start and end
stamps, never used in latency arithmetic. GPUs are read through NVML (utilisation, memory,
power, SM clock); CPU and memory through psutil, so CPU-only nodes report too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
import ray


def _nvml_handles() -> list[Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no driver: CPU rows only
        return []


def sample(node_id: str, handles: list[Any]) -> list[dict[str, Any]]:
    now = time.time()
    vm = psutil.virtual_memory()
    base = {"t_wall": now, "node_id": node_id, "cpu_percent": psutil.cpu_percent(), "host_mem_used_bytes": int(vm.used)}
    if not handles:
        return [{**base, "gpu": None}]
    import pynvml

    rows = []
    for i, h in enumerate(handles):
        util = pynvml.nvmlDeviceGetUtilizationRates(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        rows.append(
            {
                **base,
                "gpu": i,
                "gpu_util_percent": float(util.gpu),
                "gpu_mem_used_bytes": int(mem.used),
                "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu_sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            }
        )
    return rows


@ray.remote(num_cpus=0)
class TelemetrySampler:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.node_id = ray.get_runtime_context().get_node_id()
        self.handles = _nvml_handles()
        self.rows: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        psutil.cpu_percent()  # the first call only primes the counter
        self._task = asyncio.create_task(self._loop())
        return self.node_id

    async def _loop(self) -> None:
        while True:
            self.rows.extend(sample(self.node_id, self.handles))
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> list[dict[str, Any]]:
        if self._task is not None:
            self._task.cancel()
        self.rows.extend(sample(self.node_id, self.handles))
        return self.rows
