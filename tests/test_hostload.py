"""Host load per cell: CPU burnt by a process outside the run counts as other processes' CPU."""

import subprocess
import sys
import time

from cluster.hostload import HostLoadProbe


def test_a_process_outside_the_run_shows_as_other_cpu():
    probe = HostLoadProbe()
    # `sh` exits at once, so the burner is re-parented away from this process: not the run's.
    subprocess.run(["sh", "-c", f"{sys.executable} -c 'import time; t=time.time()\nwhile time.time()-t<1.5: pass' &"], check=True)
    time.sleep(1.6)
    load = probe.stop()
    assert load.cores >= 1 and load.wall_s >= 1.5 and load.load_avg_1m >= 0
    # One of `cores` cores busy for the whole window; leave room for scheduling on a shared host.
    assert load.other_processes_cpu_percent >= 0.5 * 100 / load.cores
    assert load.cpu_busy_percent >= load.other_processes_cpu_percent and 0 <= load.cpu_steal_percent <= 100


def test_the_runs_own_cpu_is_not_other():
    probe = HostLoadProbe()
    cpu0, t = time.process_time(), time.monotonic()
    while time.monotonic() - t < 1.0:
        pass
    ours = 100 * (time.process_time() - cpu0) / (load := probe.stop()).wall_s / load.cores  # what this loop got, however busy the host
    assert ours > 1
    assert load.other_processes_cpu_percent <= load.cpu_busy_percent - ours + 5
