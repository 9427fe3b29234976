"""The run's file writer: jobs run in order, a failed job's error reaches the loop, and closing
writes whatever is still queued."""

import asyncio
import threading
import time

import pytest

from cluster.file_writer import FileWriter


def test_jobs_run_in_order_off_the_calling_thread():
    w, seen = FileWriter(), []

    def job(i: int) -> None:
        time.sleep(0.01 * (5 - i))  # later jobs are quicker: order holds anyway
        seen.append((i, threading.current_thread() is threading.main_thread()))

    for i in range(5):
        w.submit(job, i)
    asyncio.run(w.flush())
    w.close()
    assert seen == [(i, False) for i in range(5)]


def test_a_failed_job_is_raised_by_flush_and_later_jobs_still_run():
    w, seen, gate = FileWriter(), [], threading.Event()

    def boom() -> None:
        gate.wait()  # still running when the next job is queued
        raise OSError("disk full")

    w.submit(boom)
    w.submit(seen.append, "after")
    gate.set()
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(w.flush())
    w.close()
    assert seen == ["after"]


def test_a_failed_job_is_raised_by_the_next_submit():
    w = FileWriter()
    w.submit(lambda: 1 / 0)
    time.sleep(0.2)
    with pytest.raises(ZeroDivisionError):
        w.submit(print)
    w.close()


def test_close_writes_what_is_still_queued():
    w, gate, seen = FileWriter(), threading.Event(), []
    w.submit(gate.wait)
    for i in range(3):
        w.submit(seen.append, i)
    threading.Timer(0.1, gate.set).start()
    w.close()
    assert seen == [0, 1, 2]
