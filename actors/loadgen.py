"""The load-generator actor: sends a cell's requests on schedule and timestamps what comes back.

Runs beside its cell's entry actor (0 CPUs: it waits on I/O; LLMPerf's one-CPU-per-client actors
could not even be scheduled on small clusters). Every request carries its intended send time and
its actual send time, stamped by the backend where the request leaves, so a late client shows up
as send lag (`queue_delay_s`) instead of as a slower server. Every message that carried tokens
keeps its own arrival time (one ITL gap per message, as vLLM's bench does).

Before the measured phase it times the bare actor hop to the entry (`harness_hop_s`, streaming
no-ops), so the packet says how much of each TTFT is the harness rather than the engine. It
talks to a backend (actors/backends.py): a pdbench entry actor or an OpenAI-compatible HTTP
server, through one streaming interface, and publishes what it sees as live metrics (role
`loadgen`) in batches, off the send path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from actors.backends import Backend, Exchange, ThreadSend, open_backend
from actors.metrics import BatchedFeed, current_actor_tags
from actors.progress import CellCounter
from analysis.errortext import one_line
from analysis.records import table_bytes, table_from_bytes, to_table
from workloads.requests import PackedRequests, RequestSpec

# The bare hop's probe, per cell: 5 streaming no-ops. With 20 the probe was half of a small
# cell's CPU in the load generator and the engine (2 virtual nodes, 2 requests per cell: 13.2 -> 6.8
# and 9.6 -> 4.5 CPU-s over 300 cells without it), for a floor the median of 5 gives as well.
HOP_PROBE_CALLS = 5
# An open-loop request is prepared this long before it is due; the backend sends it on time.
LEAD_S = 0.002
# A thread waiting for the GIL gets it within this (the sender, at its due time): 200 us left the
# send lag p99 at 1.2-1.3 ms at 1,000 req/s, 50 us at 0.8 ms, for the same CPU.
GIL_SWITCH_S = 0.00005
# The sender thread's spin before each send (actors/backends.py SPIN_S is the event loop's). Real-time,
# the thread wakes from its sleep within tens of microseconds; a longer spin only burns a core the
# replies need (1,000 req/s, 2 cores: lag p99 0.8-1.2 ms with 100 us, 2.0-2.3 ms with 300 us).
THREAD_SPIN_S = 0.0001
# During an open-loop phase the sender thread runs real-time (SCHED_FIFO) and the process's other
# threads (the loop reading replies, Ray's I/O threads) at this nice value, where the process may
# raise them (root, CAP_SYS_NICE): on a shared host, a send otherwise waits for a core behind other
# processes (1,000 req/s, 2 cores: lag p99 11 ms at normal priority, 1.2-2 ms raised, same CPU).
SENDER_RT_PRIORITY = 10
OPEN_LOOP_NICE = -10
# After a failed request, how long the load generator waits for the engine to confirm that the report
# asked with the load was cancelled before it asks again.
CANCEL_WAIT_S = 10.0

log = logging.getLogger(__name__)


def _request(spec: RequestSpec) -> dict[str, Any]:
    return {"request_id": spec.request_id, "prompt_token_ids": list(spec.prompt_token_ids), "max_tokens": spec.max_tokens}


def _new_record(spec: RequestSpec, t_scheduled: float) -> dict[str, Any]:
    return {
        "request_id": spec.request_id,
        "warmup": spec.warmup,
        "input_tokens": len(spec.prompt_token_ids),
        "max_tokens": spec.max_tokens,
        "t_scheduled": t_scheduled,
        "t_sent": None,
        "t_chunks": [],  # arrival of each message that carried tokens
        "chunk_tokens": [],  # tokens in that message
        "output_token_ids": [],
        "ok": False,
        "error": None,
        "server": None,
    }


async def _send(
    backend: Backend,
    feed: BatchedFeed,
    spec: RequestSpec,
    t0: float,
    t_scheduled: float,
    timeout_s: float | None,
    ex: Exchange | None = None,
    req: dict[str, Any] | None = None,
) -> dict:
    """One request; `ex` carries an open-loop request's send time (`not_before`) or the reply stream
    of a request a sender thread already sent; None to send now."""
    rec = _new_record(spec, t_scheduled)
    req = req if req is not None else _request(spec)
    ex = ex if ex is not None else Exchange()
    feed.started(len(spec.prompt_token_ids))

    async def consume() -> None:
        async for delta in backend.stream(req, ex):
            ids = delta["token_ids"]
            if ids:
                rec["t_chunks"].append(delta["t_recv"] - t0)
                rec["chunk_tokens"].append(len(ids))
                rec["output_token_ids"].extend(ids)
            rec.setdefault("server_token_s", []).extend(delta["token_s"])
            if delta["finished"]:
                rec["error"] = delta["error"]
                rec["ok"] = delta["error"] is None
                rec["server"] = delta["server"]

    try:
        async with asyncio.timeout(timeout_s):  # no extra task (wait_for's) between schedule and send
            await consume()
    except TimeoutError:
        rec["error"] = f"timeout after {timeout_s} s"
    except Exception as e:  # actor died, engine raised: the request fails, the cell goes on
        rec["error"] = f"{type(e).__name__}: {e}"
    # A request that failed before it left was never sent: it counts as sent when it was due.
    rec["t_sent"] = (ex.t_sent - t0) if ex.t_sent is not None else t_scheduled
    rec["client_send_s"] = ex.client_send_s
    t = rec["t_chunks"]
    n = len(rec["output_token_ids"])
    feed.finished(
        rec["ok"],
        n,
        t[0] - rec["t_sent"] if t else None,
        (t[-1] - t[0]) / (n - 1) if n >= 2 else None,
        t[-1] - rec["t_sent"] if t else None,
    )
    return rec


@dataclass
class CellLoad:
    """An aggregated cell's one call (`LoadGenerator.run_cell`): its records and what was read
    around them, each stage timed on the load generator's clock."""

    requests: pa.Table  # the records as typed rows (analysis/records.py), made here rather than on the driver
    begin_s: float  # the engines made ready for the cell (the reset of a warm engine), on the engine's clock
    load_s: float  # `run`: warm-up, hop probe, measured requests
    after_s: float  # after the load: the reads (memory, router counts) and the typing of the records
    memory: list[dict[str, Any] | None]  # each engine's memory report after the load; None where the read failed
    counts: list[int] | None = None  # requests per replica (a router's), None for one engine
    faults: list[str] = field(default_factory=list)  # reads after the load that failed: the records stay
    engines_busy: int = 0  # requests still in the engines after the load (timed out): not fit for another cell
    t_start: float = 0.0  # time.monotonic() as the call began here (the host's clock: the driver's, on one host)
    queued_s: float = 0.0  # from the call's start here to the cell's turn, where another cell was running then (else 0)
    idle_before_s: float | None = None  # the end of this load generator's previous load to this one's start; None: its first cell
    # This cell's place among the deployment's cells as they ran (1: its first). Ray does not order an
    # async actor's calls, so a queued cell can run before the one that started the deployment.
    cell_on_engine: int = 1

    def __reduce__(self) -> tuple[Any, ...]:
        """The records travel to the driver as one Arrow IPC stream (analysis/records.py `table_bytes`)."""
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "requests"}
        return (_cell_load, (table_bytes(self.requests), rest))


def _cell_load(requests: bytes, rest: dict[str, Any]) -> CellLoad:
    return CellLoad(requests=table_from_bytes(requests), **rest)


async def _settle(what: str, pending: Awaitable[Any], faults: list[str]) -> Any:
    """A read after the requests ran: a failure is noted, never raised (the records are measured)."""
    try:
        return await pending
    except Exception as e:
        faults.append(f"{what}: {one_line(e)}")
        return None


def _always_quiet() -> asyncio.Event:
    quiet = asyncio.Event()
    quiet.set()
    return quiet


@ray.remote(num_cpus=0)
class LoadGenerator:
    _heap_frozen = False
    _quiet = _always_quiet()  # set: no cell of this load generator is typing its records (run_cell)

    def _freeze_heap(self) -> None:
        """The process's heap (Ray, the modules, the first warm-up) out of the collector's sight from
        the first measured phase on: a full collection over it held the GIL, and every send, ~90 ms.
        Once per load generator, and kept: a warm one serves many cells, and a collection before
        each cost ~0.2 s of CPU per cell (with 32 virtual nodes on 2 cores, the largest part of a
        small cell's cost). Objects made later are collected after each measured phase (`_no_collection`)."""
        if not self._heap_frozen:
            gc.collect()
            gc.freeze()
            self._heap_frozen = True

    def serve(self, engines: list[Any], router: Any, counter: Any) -> None:
        """The deployment this load generator serves, given once when it is placed: its engines, the
        router in front of them (None: one engine) and the run's progress counter (None: no display).
        Handles cost the driver and this process ~0.1-0.3 ms each to send with every cell."""
        self._engines, self._router, self._counter = engines, router, counter
        self._turn = asyncio.Lock()  # cells one at a time, in the order their calls came
        self._quiet = _always_quiet()
        self._load_ended: float | None = None  # the last cell's load's end
        self._cells = 0  # cells run so far

    async def run_cell(
        self, requests: PackedRequests, concurrency: int, timeout_s: float | None, tags: dict[str, str], identity: dict[str, str]
    ) -> CellLoad:
        """An aggregated cell in one call from the driver, on the deployment given to `serve`: the
        load (`run`, through the router where there is one, else the engine), its requests marked
        with the cell so that each engine begins it on the first (EngineHost.generate), then each
        engine's report (memory, its begin, requests left in it) and the router's counts. A single
        engine's report is asked with the load and answered when the cell's requests have drained
        (EngineHost.cell_report `drained`); after a failed request, and with replicas, it is asked
        after the load. A call per stage cost the cell ~0.3 s each with 32 virtual nodes on 2 cores,
        and the driver's loop a turn each. The records come back as typed rows stamped with `identity` (to_table); a read
        that failed is a fault, never raised.

        A call that comes while another cell runs (the pool's `depth` 2) waits for its turn here: its
        requests stay packed until then, so its arrival costs the running cell a copy of bytes. The
        turn passes on once the reads are in, before the records are typed: the next cell's warm-up
        runs while they are, and its measured phase waits for the typing to end (`_quiet`)."""
        t_call, waits = time.monotonic(), self._turn.locked()
        await self._turn.acquire()
        t_turn, held = time.monotonic(), [True]

        def pass_turn() -> None:
            if held[0]:
                held[0] = False
                self._quiet.clear()  # until this cell's records are typed
                self._turn.release()

        try:
            self._cells += 1
            order = self._cells
            got = await self._run_cell(requests.unpack(), concurrency, timeout_s, tags, identity, pass_turn)
        finally:
            pass_turn()
            self._quiet.set()
        load_ended = time.monotonic() - got.after_s
        idle = load_ended - got.load_s - self._load_ended if self._load_ended is not None else None
        self._load_ended = load_ended  # before the next cell's load ends: it waits for `_quiet` to measure
        queued = t_turn - t_call if waits else 0.0
        return dataclasses.replace(got, t_start=t_call, queued_s=queued, idle_before_s=idle, cell_on_engine=order)

    async def _run_cell(
        self,
        requests: list[RequestSpec],
        concurrency: int,
        timeout_s: float | None,
        tags: dict[str, str],
        identity: dict[str, str],
        pass_turn: Callable[[], None],
    ) -> CellLoad:
        engines, router = self._engines, self._router
        progress = CellCounter(self._counter, tags["cell"]) if self._counter is not None else None
        t0 = time.monotonic()
        cell = (tags["run"], tags["cell"])
        entry = router if router is not None else engines[0]
        # One engine gets every request: its report is asked now and comes back as the last one ends.
        early = engines[0].cell_report.remote(*cell, len(requests)) if router is None else None
        records = await self.run(entry, requests, concurrency, timeout_s, progress, None, tags, cell)
        t1 = time.monotonic()
        faults: list[str] = []
        if early is not None and not all(r["ok"] for r in records):
            ray.cancel(early)  # a request that failed may never finish in the engine: ask after the load
            # Its cancellation read (Ray would log an unread error), within a bound should the cancel not take.
            await asyncio.wait([asyncio.ensure_future(_settle("cancelled report", early, []))], timeout=CANCEL_WAIT_S)
            early = None
        reads = [early] if early is not None else [e.cell_report.remote(*cell) for e in engines]
        asked = asyncio.gather(*(_settle(f"engine{i} memory", r, faults) for i, r in enumerate(reads)))
        counted = _settle("router counts", router.counts.remote(), faults) if router is not None else None
        reports = await asked
        counts = await counted if counted is not None else None
        # The engines have reported this cell: the next one may begin on them, and its task starts its
        # warm-up before this one types its records (with 32 virtual nodes on 2 cores, typing a small
        # cell's records took ~0.1 s of the engine's idle time between two loads).
        pass_turn()
        await asyncio.sleep(0)
        return CellLoad(
            to_table(records, **identity),
            begin_s=max((r["begin_s"] for r in reports if r), default=0.0),
            load_s=t1 - t0,
            after_s=time.monotonic() - t1,
            memory=[r["memory"] if r else None for r in reports],
            counts=counts,
            faults=faults,
            engines_busy=sum(r["in_flight"] for r in reports if r),
        )

    async def run(
        self,
        entry: Any,
        requests: list[RequestSpec],
        concurrency: int,
        timeout_s: float | None = None,
        progress: Any = None,
        api_key: str | None = None,
        tags: dict[str, str] | None = None,
        cell: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Warm-up requests first (all at once, excluded later), the hop probe, then the measured phase.

        `entry` is an entry actor handle or a TargetSpec (HTTP server; `api_key` authenticates).
        `concurrency` is the number of closed-loop users; requests with `t_scheduled` set are
        sent open loop at t0 + t_scheduled whatever the server is doing. `tags`: the live metrics'
        run/cell where a warm load generator serves another cell than its name says. `cell` (run id,
        cell id) marks every request to an entry actor: the engine begins that cell on its first.
        """
        switch_before = sys.getswitchinterval()
        backend = open_backend(entry, api_key, cell)
        warm = [r for r in requests if r.warmup]
        measured = [r for r in requests if not r.warmup]
        try:
            async with BatchedFeed(tags or current_actor_tags("loadgen"), progress) as feed:
                # All at once, one closed-loop user each: a warm-up lasts its longest request, not the sum of
                # them (an open-loop cell's four, one after another, took 11-20 s of a warm H200's time).
                records = await self._closed(backend, feed, warm, len(warm), timeout_s)
                await self._quiet.wait()  # the cell before still typing its records (run_cell) would perturb the stamps
                # This process is the load generator's alone: a thread holding the GIL (Ray's own) must
                # not hold a stamp back for the default 5 ms switch interval. Only while the hop and the
                # measured requests are timed: outside, the GIL handed over every 50 us stretched the
                # typing of a small cell's records (0.6 ms of CPU) to ~0.1 s with 32 virtual nodes on 2 cores.
                sys.setswitchinterval(GIL_SWITCH_S)
                hop = await backend.hop_s(HOP_PROBE_CALLS)
                self._freeze_heap()
                with _no_collection():
                    if measured and measured[0].t_scheduled is not None:
                        records += await self._open(backend, feed, measured, timeout_s)
                    else:
                        records += await self._closed(backend, feed, measured, concurrency, timeout_s)
        finally:
            sys.setswitchinterval(switch_before)
            await backend.aclose()
        node = ray.get_runtime_context().get_node_id()
        for r in records:
            r["loadgen_node_id"] = node
            r["harness_hop_s"] = hop
        return records

    async def _closed(self, backend, feed, reqs, concurrency, timeout_s) -> list[dict]:
        t0 = time.monotonic()
        todo = list(reversed(reqs))
        out: list[dict] = []

        async def user() -> None:
            while todo:
                spec = todo.pop()
                # A closed-loop user is ready the moment it picks the request up.
                out.append(await _send(backend, feed, spec, t0, time.monotonic() - t0, timeout_s))

        await asyncio.gather(*(user() for _ in range(max(1, min(concurrency, len(reqs) or 1)))))
        return out

    async def _open(self, backend, feed, reqs, timeout_s) -> list[dict]:
        """Open loop at raised priority where permitted; each record says whether it was
        (`loadgen_priority_raised`: the send lag of a run at normal priority is not comparable)."""
        with _niced(OPEN_LOOP_NICE) as niced:
            if isinstance(backend, ThreadSend):
                records, realtime = await self._open_from_thread(backend, feed, reqs, timeout_s)
            else:  # sent from the event loop: no sender thread to make real-time
                records, realtime = await self._open_on_loop(backend, feed, reqs, timeout_s), True
        for r in records:
            r["loadgen_priority_raised"] = niced and realtime
        return records

    async def _open_from_thread(
        self, backend: ThreadSend, feed: BatchedFeed, reqs: list[RequestSpec], timeout_s: float | None
    ) -> tuple[list[dict], bool]:
        """A sender thread sleeps to each scheduled time and sends there (a Ray actor call may be
        made from any thread); the event loop only reads replies. On the loop, a send was late by
        whatever reply handling held the loop when it fell due (51 ms p99 at 1,000 req/s); the
        thread waits at most for the GIL, which the loop hands over within the switch interval.
        Also returns whether the thread ran real-time."""
        loop = asyncio.get_running_loop()
        # Measured open-loop requests all carry t_scheduled (workloads/requests.py); bodies are built
        # before the clock starts, off the send path.
        plan = sorted(((r.t_scheduled or 0.0, r, _request(r)) for r in reqs), key=lambda p: p[0])
        t0 = time.monotonic() + LEAD_S
        tasks: list[asyncio.Task] = []
        stop = threading.Event()
        realtime: list[bool] = []

        def read_replies(i: int, ex: Exchange) -> None:
            t_scheduled, spec, body = plan[i]
            tasks.append(asyncio.create_task(_send(backend, feed, spec, t0, t_scheduled, timeout_s, ex, body)))

        def sender() -> None:
            with _realtime() as raised:
                realtime.append(raised)
                if not raised:
                    log.warning("load generator: the sender thread runs at normal priority (no permission to raise it)")
                for i, (t_scheduled, _, body) in enumerate(plan):
                    if stop.is_set():  # the run was cancelled
                        return
                    _sleep_until(t0 + t_scheduled)
                    ex = Exchange()
                    t_sent = time.monotonic()
                    try:
                        ex.submitted = backend.submit(body)
                        ex.t_sent = t_sent
                    except Exception as e:  # never sent: the request fails with the reason, the schedule goes on
                        ex.submit_error = e
                    loop.call_soon_threadsafe(read_replies, i, ex)

        try:
            # Every read_replies is queued on the loop before the thread's end is, so all tasks exist here.
            await asyncio.to_thread(sender)
        finally:
            stop.set()
        return list(await asyncio.gather(*tasks)), all(realtime)

    async def _open_on_loop(self, backend, feed, reqs, timeout_s) -> list[dict]:
        """One dispatcher walks the schedule in order, so the event loop holds one timer, not one
        per request. It starts each request LEAD_S early; the request is prepared, then the
        backend sends it when due (actors/backends.py, Exchange.ready)."""
        t0 = time.monotonic() + LEAD_S
        tasks = []
        for spec in sorted(reqs, key=lambda r: r.t_scheduled):
            due = t0 + spec.t_scheduled
            if (wait := due - LEAD_S - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(_send(backend, feed, spec, t0, spec.t_scheduled, timeout_s, Exchange(not_before=due))))
        return list(await asyncio.gather(*tasks))


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """No cyclic garbage collection while requests are measured, one right after. The phase's own
    records, tasks and replies pile up as live objects, and the collections they set off hold the
    GIL: at 1,000 req/s open loop, stalls of ~50 ms in runs of 30-60 late sends (send lag p99 16-37
    ms over 3,000 requests on 2 cores; 0.4-0.8 ms without), and in a closed loop the same stall
    would sit in the replies' timestamps. Objects are still freed by reference counting; only the
    phase's cycles wait for its end, where the collection sees just them (the heap before is frozen)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
            gc.collect()


def _sleep_until(due: float) -> None:
    """Sleep (GIL released) to THREAD_SPIN_S before `due`, then spin: a sleep wakes up late by tens of
    microseconds and more on a busy host."""
    if (coarse := due - THREAD_SPIN_S - time.monotonic()) > 0:
        time.sleep(coarse)
    while time.monotonic() < due:  # never before the schedule
        pass


@contextlib.contextmanager
def _realtime() -> Iterator[bool]:
    """The calling thread real-time (SCHED_FIFO) for the block, then back as it was; yields whether
    it could be raised (Linux, with the permission)."""
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SENDER_RT_PRIORITY))
    except (AttributeError, PermissionError):  # not Linux; not root nor CAP_SYS_NICE nor an RLIMIT_RTPRIO
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, *before)


@contextlib.contextmanager
def _niced(nice: int) -> Iterator[bool]:
    """Every thread of this process at `nice` at most for the block, then each back to its own;
    yields whether they could be raised. Threads started inside the block keep their default."""
    before: dict[int, int] = {}
    raised = sys.platform == "linux"
    for tid in map(int, os.listdir("/proc/self/task") if raised else ()):
        try:
            if (prio := os.getpriority(os.PRIO_PROCESS, tid)) > nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                before[tid] = prio
        except ProcessLookupError:  # the thread ended
            continue
        except PermissionError:
            raised = False
            break
    try:
        yield raised
    finally:
        for tid, prio in before.items():
            with contextlib.suppress(ProcessLookupError):  # lowering a priority needs no permission
                os.setpriority(os.PRIO_PROCESS, tid, prio)
