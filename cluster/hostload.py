"""How busy the driver's host was while a cell ran, so a reader sees why timing moved.

A busy host (other agents, a compile, a noisy VM neighbour) slows every request without anything
being wrong with the engine. Each cell records the 1-minute load average, the CPU share stolen by
the hypervisor, and the CPU share used by processes that are not this run's. With the embedded Ray
the run's processes (Ray, engines, load generators) are this process and its descendants; when
joining a cluster only this host is seen and its Ray daemons count as other processes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class HostLoad:
    cores: int
    wall_s: float
    load_avg_1m: float  # at the end of the cell
    cpu_busy_percent: float  # all processes, share of all cores
    cpu_steal_percent: float  # taken by the hypervisor for other VMs (0 where the OS does not report it)
    other_processes_cpu_percent: float  # busy CPU not spent by this run's processes


def _our_cpu_s() -> float:
    """CPU seconds of this process and its descendants (reaped children included)."""
    me = psutil.Process(os.getpid())
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += c.user + c.system
    return total


def _busy_and_steal(t: psutil._common.scputimes) -> tuple[float, float, float]:
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total, total - idle, getattr(t, "steal", 0.0)


class HostLoadProbe:
    """Started before a cell, stopped after it; `stop` returns the load over that window."""

    def __init__(self) -> None:
        self._wall0 = time.monotonic()
        self._cpu0 = _busy_and_steal(psutil.cpu_times())
        self._ours0 = _our_cpu_s()

    def stop(self) -> HostLoad:
        total1, busy1, steal1 = _busy_and_steal(psutil.cpu_times())
        total0, busy0, steal0 = self._cpu0
        span = max(total1 - total0, 1e-9)  # CPU seconds summed over all cores
        ours = max(_our_cpu_s() - self._ours0, 0.0)
        return HostLoad(
            cores=psutil.cpu_count() or 1,
            wall_s=time.monotonic() - self._wall0,
            load_avg_1m=os.getloadavg()[0],
            cpu_busy_percent=100.0 * (busy1 - busy0) / span,
            cpu_steal_percent=100.0 * (steal1 - steal0) / span,
            other_processes_cpu_percent=100.0 * max(busy1 - busy0 - ours, 0.0) / span,
        )
