"""The open-loop sender thread: sends keep their schedule whatever the event loop is doing.

The backends here are in-process fakes: what is tested is when the load generator hands each
request over and what it records, not a transport.
"""

import asyncio
import dataclasses
import gc
import os
import sys
import threading
import time
from typing import Any

import pytest
import ray

from actors import loadgen
from actors.backends import ActorBackend, Exchange, ThreadSend
from actors.loadgen import LoadGenerator, _send
from actors.metrics import BatchedFeed
from actors.openai_client import OpenAIBackend
from actors.target import TargetSpec
from workloads.arrivals import Poisson
from workloads.requests import Fixed, WorkloadSpec, synthetic_requests


def _done(t: float) -> dict[str, Any]:
    return {"token_ids": [1], "token_s": [], "finished": True, "error": None, "server": None, "t_recv": t}


class BlockingReplies:
    """Reading the first reply blocks the event loop until every request has been sent (or 10 s)."""

    def __init__(self, n: int, fail: str | None = None):
        self.n, self.fail = n, fail
        self.sent: list[tuple[str, float]] = []
        self.all_sent = threading.Event()
        self.loop_blocked_until_all_sent: bool | None = None
        self.frozen_while_measured: list[int] = []
        self.collecting_while_measured: list[bool] = []
        self.switch_interval_while_sent: list[float] = []

    def submit(self, request: dict[str, Any]) -> str:
        self.sent.append((request["request_id"], time.monotonic()))
        if len(self.sent) == self.n:
            self.all_sent.set()
        if request["request_id"] == self.fail:
            raise ValueError("cannot serialize this request")
        return request["request_id"]

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None):
        self.frozen_while_measured.append(gc.get_freeze_count())
        self.collecting_while_measured.append(gc.isenabled())
        self.switch_interval_while_sent.append(sys.getswitchinterval())
        if exchange is not None and exchange.submit_error is not None:
            raise exchange.submit_error
        assert exchange is not None and exchange.submitted == request["request_id"]
        if self.loop_blocked_until_all_sent is None:
            self.loop_blocked_until_all_sent = self.all_sent.wait(timeout=10)  # holds the loop, not the GIL
        yield _done(time.monotonic())

    async def hop_s(self, calls: int) -> float | None:
        return None

    async def aclose(self) -> None:
        return None


def _poisson(n: int, rate: float = 200.0):
    return synthetic_requests(WorkloadSpec(num_requests=n, warmup_requests=0, arrival=Poisson(rate=rate)), 100, seed=2)


def _open(backend, reqs) -> list[dict]:
    lg = LoadGenerator.__ray_actor_class__()
    return asyncio.run(lg._open(backend, BatchedFeed({"run": "t", "cell": "t", "role": "loadgen"}), reqs, 30.0))


def test_actor_backend_sends_from_a_thread_and_http_from_the_loop():
    assert isinstance(BlockingReplies(1), ThreadSend) and issubclass(ActorBackend, ThreadSend)
    assert not isinstance(OpenAIBackend(TargetSpec(base_url="http://127.0.0.1:1", model="m", vocab_size=10)), ThreadSend)


def test_sends_keep_the_schedule_while_the_loop_is_held_by_a_reply():
    reqs = _poisson(20)
    backend = BlockingReplies(len(reqs))
    recs = _open(backend, reqs)
    # Every request went out while the first reply held the event loop: the loop does not send.
    assert backend.loop_blocked_until_all_sent is True
    assert [rid for rid, _ in backend.sent] == [r.request_id for r in sorted(reqs, key=lambda r: r.t_scheduled)]
    by_id = {r["request_id"]: r for r in recs}
    for spec in reqs:
        rec = by_id[spec.request_id]
        assert rec["ok"] and rec["t_scheduled"] == spec.t_scheduled
        assert rec["t_sent"] >= rec["t_scheduled"]  # never early
    # t_sent is the stamp taken in the sender thread right before the send, on the records' clock
    t0 = min(t for _, t in backend.sent) - min(r["t_sent"] for r in recs)
    for rid, t in backend.sent:
        assert by_id[rid]["t_sent"] == pytest.approx(t - t0, abs=1e-4)


def test_a_send_that_raises_fails_its_request_as_never_sent_and_the_schedule_goes_on():
    reqs = _poisson(6)
    bad = sorted(reqs, key=lambda r: r.t_scheduled)[2].request_id
    recs = _open(BlockingReplies(len(reqs), fail=bad), reqs)
    by_id = {r["request_id"]: r for r in recs}
    assert by_id[bad]["error"] == "ValueError: cannot serialize this request" and not by_id[bad]["ok"]
    assert by_id[bad]["t_sent"] == by_id[bad]["t_scheduled"]  # never sent: counts as sent when due
    assert all(r["ok"] for rid, r in by_id.items() if rid != bad)


def test_the_measured_phase_runs_with_the_heap_frozen_once_per_load_generator_and_no_collection(ray_local, monkeypatch):
    reqs = _poisson(4)
    backend = BlockingReplies(len(reqs))
    monkeypatch.setattr(loadgen, "open_backend", lambda entry, api_key, cell=None: backend)
    collections = []
    monkeypatch.setattr(loadgen.gc, "collect", lambda *a: collections.append((gc.isenabled(), gc.get_freeze_count())) or 0)
    lg = LoadGenerator.__ray_actor_class__()
    try:
        recs = asyncio.run(lg.run(None, reqs, 1))
        assert len(recs) == 4 and all(r["ok"] for r in recs)
        assert min(backend.frozen_while_measured) > 0 and gc.get_freeze_count() > 0
        assert backend.collecting_while_measured == [False] * 4 and gc.isenabled()
        # A warm load generator's next cell (closed loop this time): the heap stays frozen, never a
        # second full collection; each phase ends with one collection of what it left, after it.
        backend = BlockingReplies(len(reqs))
        closed = [dataclasses.replace(r, t_scheduled=None) for r in reqs]
        assert len(asyncio.run(lg.run(None, closed, 2))) == 4
        assert backend.collecting_while_measured == [False] * 4 and gc.isenabled()
        assert collections[0] == (True, 0)  # the one full collection, before the freeze
        assert len(collections) == 3 and all(enabled and frozen > 0 for enabled, frozen in collections[1:])
        assert min(backend.frozen_while_measured) > 0
    finally:
        gc.unfreeze()  # the test process's heap, not a load generator's


def test_the_gil_is_handed_over_often_only_while_requests_run(ray_local, monkeypatch):
    """50 us while measured requests run (a stamp is never held back by another thread); the
    process's own interval again after, where a 50 us one stretched the typing of the records tenfold on a busy box."""
    reqs = _poisson(3)
    backend = BlockingReplies(len(reqs))
    monkeypatch.setattr(loadgen, "open_backend", lambda entry, api_key, cell=None: backend)
    before = sys.getswitchinterval()
    try:
        assert len(asyncio.run(LoadGenerator.__ray_actor_class__().run(None, reqs, 1))) == 3
        assert backend.switch_interval_while_sent == [pytest.approx(loadgen.GIL_SWITCH_S)] * 3
        assert sys.getswitchinterval() == pytest.approx(before) != pytest.approx(loadgen.GIL_SWITCH_S)
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()  # the test process's heap, not a load generator's


class Instant:
    """Answers every request at once, noting the order in which they were sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.switch_interval: dict[str, float] = {}

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None):
        self.sent.append(request["request_id"])
        self.switch_interval[request["request_id"]] = sys.getswitchinterval()
        yield _done(time.monotonic())

    async def hop_s(self, calls: int) -> float | None:
        self.sent.append("hop probe")
        return None

    async def aclose(self) -> None:
        return None


def test_the_next_cell_warms_up_while_the_cell_before_types_its_records_and_measures_after(ray_local, monkeypatch):
    """run_cell passes the turn before typing; `_quiet` holds the next cell's hop probe and measured
    requests until the typing has ended, so only its warm-up overlaps it."""
    spec = WorkloadSpec(num_requests=2, warmup_requests=1, output_len=Fixed(value=1))
    reqs = synthetic_requests(spec, 100, seed=3)
    backend = Instant()
    monkeypatch.setattr(loadgen, "open_backend", lambda entry, api_key, cell=None: backend)
    lg = LoadGenerator.__ray_actor_class__()

    async def go() -> list[str]:
        lg._quiet = asyncio.Event()  # the cell before is typing
        run = asyncio.ensure_future(lg.run(None, reqs, 1))
        await asyncio.sleep(0.1)
        held = list(backend.sent)
        lg._quiet.set()
        await run
        return held

    try:
        held = asyncio.run(go())
    finally:
        gc.unfreeze()
    warm = [r.request_id for r in reqs if r.warmup]
    assert held == warm  # the warm-up went out; the probe and the measured requests waited
    assert backend.sent == [*warm, "hop probe", *(r.request_id for r in reqs if not r.warmup)]
    # The GIL is handed over every 50 us only once the cell measures: not while it warms up beside the typing.
    assert [backend.switch_interval[r.request_id] == pytest.approx(loadgen.GIL_SWITCH_S) for r in reqs] == [False, True, True]


def test_a_cell_that_fails_passes_the_turn_once_and_never_the_next_cells():
    """run_cell's turn: a cell that raises before passing it passes it on; one that raises after
    (typing its records, say) leaves the next cell's turn alone and still ends its own quiet."""
    from workloads.requests import PackedRequests

    lg = LoadGenerator.__ray_actor_class__()

    async def call(run_cell) -> None:
        lg._run_cell = run_cell
        with pytest.raises(RuntimeError, match=r"typing failed|load failed"):
            await lg.run_cell(PackedRequests.of([]), 1, None, {"run": "r", "cell": "c"}, {})

    async def go() -> None:
        lg.serve([], None, None)

        async def fails_in_load(*args):
            raise RuntimeError("load failed")

        await call(fails_in_load)
        assert not lg._turn.locked() and lg._quiet.is_set()

        async def fails_after_passing(*args):
            pass_turn = args[-1]
            pass_turn()
            await lg._turn.acquire()  # the next cell takes its turn while this one types ...
            raise RuntimeError("typing failed")  # ... and the typing fails

        await call(fails_after_passing)
        assert lg._turn.locked() and lg._quiet.is_set()  # the next cell keeps its turn; no typing holds it back

    asyncio.run(go())


@ray.remote(num_cpus=0)
class SilentAfterLast:
    """Sends its finished message, then keeps the stream open without another message."""

    async def generate(self, request: dict[str, Any]):
        yield {"token_ids": [7], "token_s": [0.0], "finished": True, "error": None, "server": {}}
        await asyncio.sleep(60)


def test_actor_replies_end_at_the_finished_message(ray_local):
    """The finished message is the last by the entry's contract; the request ends there, without
    waiting for the end of the stream (here 60 s away, past the request's 10 s timeout)."""
    spec = _poisson(1)[0]

    async def one() -> dict:
        backend = ActorBackend(SilentAfterLast.remote())
        return await _send(backend, BatchedFeed({"run": "t", "cell": "t", "role": "loadgen"}), spec, time.monotonic(), 0.0, 10.0)

    rec = asyncio.run(one())
    assert rec["ok"] and rec["error"] is None and rec["output_token_ids"] == [7]


class Watched(BlockingReplies):
    """Records the sender thread's scheduling policy at each send and the event loop thread's nice
    value while it reads replies."""

    def __init__(self, n: int):
        super().__init__(n)
        self.policies: list[int] = []
        self.loop_nice: list[int] = []

    def submit(self, request: dict[str, Any]) -> str:
        self.policies.append(os.sched_getscheduler(0))
        return super().submit(request)

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None):
        self.loop_nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        async for d in super().stream(request, exchange):
            yield d


def _may_raise_priority() -> bool:
    with loadgen._realtime() as rt, loadgen._niced(loadgen.OPEN_LOOP_NICE) as niced:
        return rt and niced


def test_open_loop_sends_real_time_with_the_process_niced_and_leaves_both_as_they_were():
    reqs = _poisson(8)
    backend = Watched(len(reqs))
    nice_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    recs = _open(backend, reqs)
    assert all(r["ok"] for r in recs)
    raised = _may_raise_priority()
    assert set(backend.policies) == {os.SCHED_FIFO if raised else os.SCHED_OTHER}
    assert set(backend.loop_nice) == {min(nice_before, loadgen.OPEN_LOOP_NICE) if raised else nice_before}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == nice_before
    assert {r["loadgen_priority_raised"] for r in recs} == {raised}


def test_the_sender_thread_is_real_time_only_inside_the_block():
    seen: list[tuple[bool, int, int]] = []

    def thread() -> None:
        with loadgen._realtime() as raised:
            inside = os.sched_getscheduler(0)
        seen.append((raised, inside, os.sched_getscheduler(0)))

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    raised, inside, after = seen[0]
    assert inside == (os.SCHED_FIFO if raised else os.SCHED_OTHER) and after == os.SCHED_OTHER


def test_without_permission_to_raise_priority_the_schedule_is_kept_and_the_log_says_so(monkeypatch, caplog):
    def refuse(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "setpriority", refuse)
    reqs = _poisson(6)
    backend = Watched(len(reqs))
    nice_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with caplog.at_level("WARNING", logger="actors.loadgen"):
        recs = _open(backend, reqs)
    assert all(r["ok"] for r in recs) and len(backend.sent) == 6
    assert set(backend.policies) == {os.SCHED_OTHER} and set(backend.loop_nice) == {nice_before}
    assert "normal priority" in caplog.text
    assert {r["loadgen_priority_raised"] for r in recs} == {False}
