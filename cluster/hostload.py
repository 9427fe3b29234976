"""How busy the driver's host was while a cell ran, so a reader sees why timing moved.

A busy host (other agents, a compile, a noisy VM neighbour) slows every request without anything
being wrong with the engine. Each cell records the 1-minute load average, the CPU share stolen by
the hypervisor, and the CPU share used by processes that are not this run's. With the embedded Ray
the run's processes (Ray, engines, load generators) are this process and its descendants; when
joining a cluster only this host is seen and its Ray daemons count as other processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class HostLoad:
    cores: int
    wall_s: float  # the sampled window (HostLoadSampler)
    load_avg_1m: float  # at the end of the cell
    cpu_busy_percent: float  # all processes, share of all cores
    cpu_steal_percent: float  # taken by the hypervisor for other VMs (0 where the OS does not report it)
    other_processes_cpu_percent: float  # busy CPU not spent by this run's processes


def _our_cpu_s() -> float:
    """CPU seconds of this process and its descendants (reaped children included)."""
    if os.path.isdir("/proc/self/task"):
        return _our_cpu_s_procfs()
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


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _our_cpu_s_procfs() -> float:
    """`_our_cpu_s` on Linux from one read of each /proc/<pid>/stat (parent, user and system time):
    psutil's walk read each process's file three times, ~30 ms a sample with 32 virtual Ray nodes
    on this host, most of the sampler's share of the driver."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    ticks: dict[int, tuple[int, int]] = {}  # pid: (own user+system, reaped children's)
    with os.scandir("/proc") as it:
        for entry in it:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # ended since the listing
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()  # after the command name, which may hold spaces
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            ticks[pid] = (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    total = sum(ticks.get(me, (0, 0)))
    todo = list(children.get(me, []))
    while todo:
        pid = todo.pop()
        total += ticks[pid][0]
        todo += children.get(pid, [])
    return total * _TICK_S


@dataclass(frozen=True)
class _Sample:
    """Cumulative counters at one instant: host CPU seconds summed over all cores, and this run's."""

    t: float  # time.monotonic()
    total_s: float
    busy_s: float
    steal_s: float
    ours_s: float


def _sample() -> _Sample:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return _Sample(time.monotonic(), sum(t), sum(t) - idle, getattr(t, "steal", 0.0), _our_cpu_s())


class HostLoadSampler:
    """One per run: a thread samples the host every `interval_s` (longer where one sample costs more
    than `budget` of a core: the walk over the run's processes grows with the nodes simulated on
    this host), and each cell reads the window its samples cover. A probe per cell walked every
    process twice per cell, which cost more than the rest of the driver's work for a small cell.

    A cell's window runs from the last sample at or before its start to the last one at its end; a
    cell shorter than an interval gets the last full interval. `HostLoad.wall_s` is the window."""

    def __init__(self, interval_s: float = 1.0, budget: float = 0.002) -> None:
        self.interval_s, self.budget = interval_s, budget
        self._lock = threading.Lock()  # psutil's process walk is not made for two threads at once
        self._stop = threading.Event()
        self.cores = psutil.cpu_count() or 1
        self._pair: tuple[_Sample | None, _Sample] = (None, self._take())  # (previous, latest), swapped whole
        self._thread = threading.Thread(target=self._loop, name="pdbench-hostload", daemon=True)
        self._thread.start()

    def _take(self) -> _Sample:
        with self._lock:
            return _sample()

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            t = time.thread_time()  # this thread's own CPU: the sample's cost
            s = self._take()
            self._pair = (self._pair[1], s)
            wait = max(self.interval_s, (time.thread_time() - t) / self.budget)

    def mark(self) -> _Sample:
        """Where a cell's window starts."""
        return self._pair[1]

    def load(self, since: _Sample) -> HostLoad:
        """The host's load over the window from `since` (a `mark`) to the latest sample."""
        previous, end = self._pair
        begin = since if end is not since else previous
        if begin is None:  # no interval sampled yet (a run's first cell, shorter than one): sample now
            begin, end = end, self._take()
        span = max(end.total_s - begin.total_s, 1e-9)  # CPU seconds summed over all cores
        # Differences of large float sums: over a millisecond window an idle host reads -1e-7, not 0.
        busy = max(end.busy_s - begin.busy_s, 0.0)
        return HostLoad(
            cores=self.cores,
            wall_s=end.t - begin.t,
            load_avg_1m=os.getloadavg()[0],
            cpu_busy_percent=100.0 * busy / span,
            cpu_steal_percent=100.0 * max(end.steal_s - begin.steal_s, 0.0) / span,
            other_processes_cpu_percent=100.0 * max(busy - max(end.ours_s - begin.ours_s, 0.0), 0.0) / span,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
