"""Host load per cell, from the run's one sampler: CPU burnt by a process outside the run counts as
other processes' CPU, the run's own does not, and a cell shorter than the sampling interval still
gets a sane window."""

import subprocess
import sys
import time

from cluster.hostload import HostLoadSampler


def test_a_process_outside_the_run_shows_as_other_cpu():
    host = HostLoadSampler(interval_s=0.1, budget=1.0)  # samples on time: the window covers what the test does
    try:
        mark = host.mark()
        # `sh` exits at once, so the burner is re-parented away from this process: not the run's.
        subprocess.run(["sh", "-c", f"{sys.executable} -c 'import time; t=time.time()\nwhile time.time()-t<1.5: pass' &"], check=True)
        time.sleep(1.6)
        load = host.load(mark)
    finally:
        host.close()
    assert load.cores >= 1 and load.wall_s >= 1.2 and load.load_avg_1m >= 0
    # One of `cores` cores busy for most of the window; leave room for scheduling on a shared host.
    assert load.other_processes_cpu_percent >= 0.4 * 100 / load.cores
    assert load.cpu_busy_percent >= load.other_processes_cpu_percent and 0 <= load.cpu_steal_percent <= 100


def test_the_runs_own_cpu_is_not_other():
    host = HostLoadSampler(interval_s=0.1, budget=1.0)  # samples on time: the window covers what the test does
    try:
        mark = host.mark()
        cpu0, t = time.process_time(), time.monotonic()
        while time.monotonic() - t < 1.0:
            pass
        time.sleep(0.3)  # the sampler's next sample covers the whole loop
        load = host.load(mark)
        ours = 100 * (time.process_time() - cpu0) / load.wall_s / load.cores  # what this loop got, however busy the host
    finally:
        host.close()
    assert ours > 1
    assert load.other_processes_cpu_percent <= load.cpu_busy_percent - ours + 5


def test_a_cell_shorter_than_an_interval_gets_the_last_full_interval():
    host = HostLoadSampler(interval_s=0.3, budget=1.0)
    try:
        first = host.load(host.mark())  # before any interval was sampled: one is sampled on the spot
        time.sleep(0.5)
        short = host.load(host.mark())  # no sample between mark and load
    finally:
        host.close()
    assert first.wall_s > 0 and 0.25 <= short.wall_s <= 1.0
    for load in (first, short):
        assert 0 <= load.other_processes_cpu_percent <= load.cpu_busy_percent <= 100.0 + 1e-6


def test_a_costly_sample_stretches_the_interval_to_the_budget(monkeypatch):
    import cluster.hostload as hl

    real = hl._our_cpu_s

    def costly() -> float:
        t = time.process_time()
        while time.process_time() - t < 0.05:  # a walk over many processes: 50 ms of CPU
            pass
        return real()

    monkeypatch.setattr(hl, "_our_cpu_s", costly)
    host = HostLoadSampler(interval_s=0.05, budget=0.25)  # 50 ms per sample at 25% of a core: one per ~200 ms
    try:
        time.sleep(1.0)
        ends = host._pair
    finally:
        host.close()
    assert ends[0] is not None and ends[1].t - ends[0].t >= 0.15


def test_the_procfs_walk_counts_what_psutil_counts():
    import os

    import psutil

    import cluster.hostload as hl

    burner = subprocess.Popen([sys.executable, "-c", "import time; t=time.time()\nwhile time.time()-t<0.6: pass"])
    try:
        time.sleep(0.5)  # the child has CPU time of its own to count
        me = psutil.Process(os.getpid())
        t = me.cpu_times()
        kids = sum(c.cpu_times().user + c.cpu_times().system for c in me.children(recursive=True))
        want = t.user + t.system + t.children_user + t.children_system + kids
        got = hl._our_cpu_s_procfs()
    finally:
        burner.wait()
    assert want > 0.2 and abs(got - want) < 0.1  # clock ticks and the time between the two reads


def test_an_idle_millisecond_reads_zero_not_a_rounding_error_below_it():
    from cluster.hostload import _Sample

    host = HostLoadSampler(interval_s=60.0)
    try:
        big = 123456.789  # cumulative CPU seconds: their difference over an idle moment rounds below 0
        begin = _Sample(t=1.0, total_s=big, busy_s=big / 3, steal_s=big / 7, ours_s=0.0)
        end = _Sample(t=1.002, total_s=big + 0.004, busy_s=big / 3 - 1.5e-9, steal_s=big / 7 - 1e-9, ours_s=0.0)
        host._pair = (begin, end)
        load = host.load(begin)
    finally:
        host.close()
    assert load.cpu_busy_percent == 0.0 and load.cpu_steal_percent == 0.0 and load.other_processes_cpu_percent == 0.0
