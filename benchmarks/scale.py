"""How does a sweep of many cells scale over many nodes? A simulated multi-node Ray cluster.

Starts `ray.cluster_utils.Cluster` with `--nodes` virtual nodes of 1 CPU each on this machine and
runs an E1 grid of `--cells` cells on the simulated engine (a few requests per cell, one cell per
node at a time: max_concurrent_cells = nodes) through pdbench's own driver, twice, side by side
on the same cluster: every cell with warm engines (the default), then the first `--fresh-cells`
cells with a fresh engine per cell (`fresh_engines`). Reports, per run:

- wall time, and the driver's own overhead, `driver_overhead_fraction`: the CPU time of the driver
  process over the whole run (its setup, the event loop placing cells and reading their results,
  the file writer's thread encoding each cell's files and the running manifest, the host-load
  sampler, Ray's own threads in the process, and the packet's run-level files and reports at the
  end) divided by the run's wall time. It is the share of one core the driver took, whatever else
  the box runs: it counts every piece of the driver's work and no time spent waiting for cells.
  Broken down by phase of the main thread (`main_cpu_by_phase_s`: setup, loop, finalize) and by
  thread. Beside it `loop_busy_fraction`: the time the event loop was not waiting in its selector,
  over wall; on a box with more runnable processes than cores that also counts the time the loop
  was runnable but not running (starvation by the cells' own processes), so it reads higher than
  the driver's own work;
- per cell: scheduling latency (cell start to its engines ready: placement and engine start, or
  the reset of a warm engine), load time (the load generator's run) and fixed cost, what the sweep
  pays for the cell beyond its load (on a warm engine the deployment's gap between the previous
  cell's load and this one's, `engine_use.gap_s`; for a cell that started its engine, cell wall
  time minus load time), p50/p90/max, warm and fresh apart; and how many cells' calls waited in
  the load generator behind the cell before (the pool's depth 2, cluster/cells/engine_pool.py);
- cells per node and engine starts (from the manifest);
- the idle floor (`idle_floor`): before the runs, the box's CPU over `--idle-s` seconds with the
  cluster up and nothing placed (Ray's daemons of every node), then with one idle actor on each of
  a few nodes (what one more actor process costs doing nothing); per run, the floor those make with
  the run's own actor processes (`idle_floor_share_of_cores`): the share of the box gone before any
  cell works;
- the whole box's CPU over the run by role (`box_cpu_by_role_s`): pdbench's actors by class, Ray's
  own processes (raylets, GCS, agents, workers that hold no actor), the driver, and everything else.
  N virtual nodes on 2 cores each bring their own raylet, agents and actor processes, and every
  Ray process spends CPU when idle (an idle actor ~0.8% of a core on this box): at 32 nodes they
  fill the box, and a cell's fixed cost then measures waiting for a core, not pdbench's work. Read
  the fixed cost beside this row.

Goal (2 cores, 24 GiB): `--nodes 32 --cells 1000` completes, driver overhead (driver_overhead_fraction) < 2% of wall,
cells spread over all nodes, fixed cost per cell with warm engines < 0.2 s.

    python benchmarks/scale.py [--nodes 4] [--cells 40] [--requests 2] [--fresh-cells N] [--idle-s 10] [--json] [--profile FILE]

The evidence is simulated (the simulated engine on virtual nodes sharing one machine's cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import multiprocessing as mp
import os
import selectors
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import psutil
import ray

from cluster.config import ExperimentConfig, resolve
from cluster.driver import Driver, RunOptions

STORE_BYTES = 80 * 1024 * 1024  # per virtual node: the object store holds little here


class TimedSelector(selectors.DefaultSelector):
    """The event loop's selector, timing how long the loop sat waiting: the rest of its time is
    the driver's own work."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_s = 0.0

    def select(self, timeout: float | None = None) -> Any:
        t = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle_s += time.perf_counter() - t


class TimedLoops(asyncio.DefaultEventLoopPolicy):
    """Every new event loop (the driver's asyncio.run) gets a TimedSelector; their times add up."""

    def __init__(self) -> None:
        super().__init__()
        self.selectors: list[TimedSelector] = []
        self.loop_s = 0.0

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        sel = TimedSelector()
        self.selectors.append(sel)
        return asyncio.SelectorEventLoop(sel)


def grid(cells: int) -> dict[str, Any]:
    """E1 params with exactly `cells` cells: distinct input lengths × one output length."""
    return {"input_lens": list(range(8, 8 + cells)), "output_lens": [4]}


def config(nodes: int, cells: int, requests: int, fresh: bool) -> ExperimentConfig:
    return resolve(
        "e1",
        {
            "engine": {"kind": "simulated"},
            "workload": {"num_requests": requests, "warmup_requests": 1},
            "params": grid(cells),
            "max_concurrent_cells": nodes,
            "fresh_engines": fresh,
        },
    )


@dataclass
class Spread:
    p50: float
    p90: float
    max: float

    @staticmethod
    def of(values: list[float]) -> Spread | None:
        if not values:
            return None
        a = np.asarray(values)
        return Spread(float(np.percentile(a, 50)), float(np.percentile(a, 90)), float(a.max()))


@dataclass
class RunScale:
    engines: str  # warm or fresh
    cells: int
    cells_ok: int
    wall_s: float
    driver_overhead_fraction: float  # driver_cpu_s / wall_s: the driver's own work, every thread and phase, over wall
    loop_s: float  # the driver's event loop: from its start to its end
    loop_busy_s: float  # ... minus the time it waited
    loop_busy_fraction: float  # loop_busy_s / wall_s: the loop's running time, starvation included
    outside_loop_s: float  # the driver before and after its loop (connect, plan, the packet's run-level files)
    driver_cpu_s: float  # the driver process's CPU time (Ray's own threads in it included)
    driver_cpu_fraction: float  # = driver_overhead_fraction (kept under its old name)
    driver_cpu_per_cell_ms: float  # driver_cpu_s per cell, setup and the packet's run-level files included
    main_cpu_by_phase_s: dict[str, float]  # the main thread's CPU: setup (before the loop), loop, finalize (after it)
    driver_cpu_by_thread_s: dict[str, float]  # main (the loop, setup, finalize), Ray's threads, threads that ended (writer, sampler)
    engine_starts: int
    cells_on_warm_engines: int
    nodes_used: int
    cells_per_node: dict[str, int]
    scheduling_s: Spread | None  # cell start to engines ready, all cells
    scheduling_warm_s: Spread | None  # ... cells on a warm engine
    load_s: Spread | None
    # A cell's fixed cost, what the sweep pays for it beyond its load: where another cell ran before it
    # on its deployment (warm), the gap between that cell's load and this one's (engine_use.gap_s);
    # else (fresh: the deployment's first cell to run, which started the engine or waited for it) wall - load.
    fixed_s: Spread | None  # all cells
    fixed_warm_s: Spread | None  # ... cells after another on a warm engine
    fixed_fresh_s: Spread | None  # ... a deployment's first cell
    cells_queued: int  # cells whose call waited in the load generator behind the cell before (the pool's depth 2)
    # p50 over warm cells of each part of the cell's wall beyond its load: setup (the reset), after (the
    # reads after the load), call and reply (the driver's call reaching the load generator, its reply
    # reaching the driver's loop), queued (waiting behind the cell before), driver (the rest: the
    # driver's own work and waits). Queued, a cell's call and the reply before it overlap the loads.
    # Beside them: gap (the fixed cost above).
    fixed_warm_stages_p50_s: dict[str, float] | None
    box_cpu_by_role_s: dict[str, float]  # the box's CPU over the run by role (box_cpu_roles); processes that ended are not counted
    box_cpu_share_of_cores: float  # the box's CPU over the run (all roles) / (wall × cores)
    actor_processes: int  # processes that held one of the run's actors (engines, load generators, samplers, counter)
    idle_floor_share_of_cores: float | None  # (idle daemons + actor_processes × an idle actor's share) / cores


@dataclass
class IdleFloor:
    """What the cluster costs the box while nothing works: Ray's daemons of every node (raylet, agents,
    log monitor, GCS) with no actor placed, and one idle actor process (Ray's core worker wakes its
    main thread every 10 ms to check for signals, so a process that does nothing still runs)."""

    seconds: float
    daemons_cores: float  # Ray's own processes, CPU-seconds per second
    daemons_by_role_s: dict[str, float]
    actor_core_share: float  # one idle actor process, CPU-seconds per second
    actors_probed: int


@ray.remote(num_cpus=0)
class IdleProbe:
    """An actor that does nothing: what one more actor process costs the box."""

    def ready(self) -> bool:
        return True


def idle_floor(seconds: float, probes: int) -> IdleFloor:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    box = BoxCPU()
    time.sleep(seconds)
    roles = box.stop().roles
    daemons = {k: v for k, v in roles.items() if k.startswith("ray: ")}
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]][:probes]
    actors = [
        IdleProbe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()  # type: ignore[attr-defined]  # ray actor class
        for n in nodes
    ]
    ray.get([a.ready.remote() for a in actors])
    box = BoxCPU()
    time.sleep(seconds)
    probed = box.stop().roles.get("pdbench: IdleProbe", 0.0)
    for a in actors:
        ray.kill(a)
    return IdleFloor(seconds, sum(daemons.values()) / seconds, daemons, probed / seconds / max(len(actors), 1), len(actors))


_RAY_OWN = (
    ("raylet", "ray: raylets"),
    ("gcs_server", "ray: GCS"),
    ("ray::DashboardAgent", "ray: dashboard agents"),
    ("ray::RuntimeEnvAgent", "ray: runtime-env agents"),
    ("log_monitor", "ray: log monitor"),
    ("monitor.py", "ray: monitor"),
)


_NO_ACTOR = "ray: workers without an actor"


def role_of(cmd: str, driver_pid: int, pid: int) -> str:
    """A process's role from its command line. Ray titles a worker `ray::[name:]Class-or-function[.method]`
    while it runs something (a task, or an actor's call) and an async actor's between calls `ray::IDLE`,
    so the run's actors are named by the cluster's actor table instead (BoxCPU.stop); what is left
    titled is a task's worker (`ray worker: hardware`)."""
    if pid == driver_pid:
        return "driver"
    own = next((name for key, name in _RAY_OWN if key in cmd), None)
    if own:
        return own
    if cmd.startswith("ray::"):
        cls = cmd.split()[0][5:].rsplit(":", 1)[-1].split(".")[0]
        return _NO_ACTOR if cls == "IDLE" else f"ray worker: {cls}"
    return _NO_ACTOR if "default_worker.py" in cmd else "other processes"


def _poll_box(stop: Any, out: Any, driver_pid: int, every_s: float) -> None:
    """In its own process (its CPU is not the driver's): every process's CPU, first and last seen,
    so a process that ends during the run (the run's actors end with it) keeps what it spent."""
    seen: dict[int, list[Any]] = {}  # pid → [CPU when first seen, CPU when last seen, role by title]
    first = True
    while True:
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                cpu = t.user + t.system
                role = role_of(" ".join(p.info["cmdline"] or []), driver_pid, p.pid)
                if p.pid not in seen:
                    seen[p.pid] = [cpu if first else 0.0, cpu, role]
                else:  # a worker becomes an actor's process (its title changes) and stays one
                    seen[p.pid][1:] = [cpu, role if role != _NO_ACTOR else seen[p.pid][2]]
        if first:
            out.send("ready")
        first = False
        if stop.wait(every_s):
            break
    out.send({pid: (c1 - c0, role) for pid, (c0, c1, role) in seen.items()})


class BoxSpent(NamedTuple):
    roles: dict[str, float]  # CPU seconds by role over the block
    actor_processes: int  # processes among them that held an actor


class BoxCPU:
    """The box's CPU by role over a block (box_cpu_by_role_s), polled by a process of its own."""

    def __init__(self, every_s: float = 2.0) -> None:
        ctx = mp.get_context("spawn")
        self._stop, (self._recv, send) = ctx.Event(), ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_poll_box, args=(self._stop, send, os.getpid(), every_s), daemon=True)
        self._proc.start()
        self._recv.recv()  # its first sweep is the baseline: the block starts after it

    def stop(self) -> BoxSpent:
        """CPU seconds by role. An actor's process is known by the cluster's actor table (dead actors
        included): between calls Ray titles an async actor's process `ray::IDLE`, like a worker's."""
        from ray._private import state

        self._stop.set()
        spent: dict[int, tuple[float, str]] = self._recv.recv()
        self._proc.join()
        actors = {a["Pid"]: a["ActorClassName"] for a in state.actors().values() if a.get("Pid")}
        roles: dict[str, float] = {}
        for pid, (cpu, role) in spent.items():
            key = f"pdbench: {actors[pid]}" if pid in actors else role
            roles[key] = roles.get(key, 0.0) + cpu
        by_role = {k: round(v, 2) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])}
        return BoxSpent(by_role, sum(pid in actors for pid in spent))


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads: the main thread, other Python threads by name,
    the rest (Ray's own) by their OS name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out: Counter[str] = Counter()
    for t in psutil.Process().threads():
        if t.id == main:
            name = "main"
        elif t.id in names:
            name = names[t.id]
        else:
            try:
                name = "ray/other: " + Path(f"/proc/self/task/{t.id}/comm").read_text().strip()
            except OSError:
                name = "ray/other"
        out[name] += t.user_time + t.system_time
    return dict(out)


def measure(cfg: ExperimentConfig, address: str, out: Path, floor: IdleFloor | None) -> RunScale:
    policy = TimedLoops()
    asyncio.set_event_loop_policy(policy)
    threads0, box = thread_cpu(), BoxCPU()
    cpu0, t0, main0 = time.process_time(), time.monotonic(), time.thread_time()
    driver = Driver(cfg, RunOptions(out_dir=out, address=address, progress=False))
    # The loop's own span: from the driver's first cell task to the last cell's end (asyncio.run).
    run_all = driver._run_all
    marks: list[float] = []  # the main thread's CPU clock where the loop began and ended

    async def timed(on_progress: Any) -> list[dict[str, Any]]:
        t = time.monotonic()
        marks.append(time.thread_time())
        try:
            return await run_all(on_progress)
        finally:
            marks.append(time.thread_time())
            policy.loop_s += time.monotonic() - t

    driver._run_all = timed  # type: ignore[method-assign]
    try:
        run_dir = driver.run()
    finally:
        asyncio.set_event_loop_policy(None)
    wall, cpu, main1 = time.monotonic() - t0, time.process_time() - cpu0, time.thread_time()
    roles, actor_processes = box.stop()
    phases = {"setup": marks[0] - main0, "loop": marks[1] - marks[0], "finalize": main1 - marks[1]}
    by_thread = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu().items()}
    by_thread["ended during the run"] = cpu - sum(by_thread.values())
    idle = sum(s.idle_s for s in policy.selectors)
    busy = max(0.0, policy.loop_s - idle)
    m = json.loads((run_dir / "manifest.json").read_text())
    metas = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*/cell.json"))]
    uses = [(m_, m_.get("engine_use") or {}) for m_ in metas]
    per_node = Counter(n for c in m["cells"].values() for n in (c.get("nodes") or {}).get("engine", []))

    def fixed(which: str | None) -> list[float]:
        """Per cell: the gap after the cell before on its deployment (warm), else wall - load (fresh:
        the cell started, or waited for, the engine; with two calls at a new deployment either may run first)."""
        gaps = [(c, u.get("gap_s"), u["load_s"]) for c, u in uses if u]
        own = [(c, g, load) for c, g, load in gaps if which is None or (g is not None) == (which == "reused")]
        return [g if g is not None else c["wall_s"] - load for c, g, load in own]

    def stages() -> dict[str, float] | None:
        warm = [(c, u) for c, u in uses if u and u["engine"] == "reused"]
        if not warm:
            return None
        names = ("setup", "after", "call", "reply", "queued")
        parts = {k: [u.get(f"{k}_s", 0.0) for _, u in warm] for k in names}
        parts["driver"] = [c["wall_s"] - u["load_s"] - sum(u.get(f"{k}_s", 0.0) for k in names) for c, u in warm]
        parts["gap"] = [u["gap_s"] for _, u in warm if u.get("gap_s") is not None]  # the fixed cost above
        return {k: round(float(np.percentile(v, 50)), 4) for k, v in parts.items() if v}

    return RunScale(
        engines="fresh" if cfg.fresh_engines else "warm",
        cells=len(metas),
        cells_ok=sum(c["status"] == "ok" for c in metas),
        wall_s=wall,
        driver_overhead_fraction=cpu / wall,
        loop_s=policy.loop_s,
        loop_busy_s=busy,
        loop_busy_fraction=busy / wall,
        outside_loop_s=wall - policy.loop_s,
        driver_cpu_s=cpu,
        driver_cpu_fraction=cpu / wall,
        driver_cpu_per_cell_ms=1e3 * cpu / max(len(metas), 1),
        main_cpu_by_phase_s={k: round(v, 3) for k, v in phases.items()},
        driver_cpu_by_thread_s={k: round(v, 3) for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1])},
        engine_starts=m["engine_pool"]["engine_starts"],
        cells_on_warm_engines=m["engine_pool"]["cells_on_warm_engines"],
        nodes_used=len(per_node),
        cells_per_node={k[:8]: v for k, v in sorted(per_node.items())},
        scheduling_s=Spread.of([u["setup_s"] for _, u in uses if u]),
        scheduling_warm_s=Spread.of([u["setup_s"] for _, u in uses if u and u["engine"] == "reused"]),
        load_s=Spread.of([u["load_s"] for _, u in uses if u]),
        fixed_s=Spread.of(fixed(None)),
        fixed_warm_s=Spread.of(fixed("reused")),
        fixed_fresh_s=Spread.of(fixed("fresh")),
        cells_queued=m["engine_pool"].get("cells_queued", 0),
        fixed_warm_stages_p50_s=stages(),
        box_cpu_by_role_s=roles,
        box_cpu_share_of_cores=sum(roles.values()) / (wall * (os.cpu_count() or 1)),
        actor_processes=actor_processes,
        idle_floor_share_of_cores=(
            None if floor is None else (floor.daemons_cores + actor_processes * floor.actor_core_share) / (os.cpu_count() or 1)
        ),
    )


@contextlib.contextmanager
def profiled(path: Path | None) -> Iterator[None]:
    """cProfile of the driver's main thread (its event loop) while the block runs, saved as pstats."""
    if path is None:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(path)


def start_cluster(nodes: int) -> Any:
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": STORE_BYTES, "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        c.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
    c.wait_for_nodes()
    return c


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4, help="virtual Ray nodes of 1 CPU each")
    ap.add_argument("--cells", type=int, default=40, help="cells of the sweep (an E1 grid)")
    ap.add_argument("--requests", type=int, default=2, help="measured requests per cell (plus 1 warm-up)")
    ap.add_argument("--fresh-cells", type=int, default=None, help="cells run again with fresh engines, side by side (default: 2 × nodes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument(
        "--idle-s", type=float, default=10.0, help="seconds to measure the idle cluster, and again one idle actor on a few nodes (0: skip)"
    )
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile (pstats) of the driver's warm run to this file")
    a = ap.parse_args(argv)
    if a.nodes < 1 or a.cells < 1 or a.requests < 1:
        ap.error("--nodes, --cells and --requests must be at least 1")
    fresh_cells = min(a.cells, 2 * a.nodes if a.fresh_cells is None else a.fresh_cells)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    cluster = start_cluster(a.nodes)
    start_s = time.monotonic() - t0
    runs: list[RunScale] = []
    try:
        ray.init(address=cluster.address, namespace="pdbench", log_to_driver=False)
        floor = idle_floor(a.idle_s, min(a.nodes, 4)) if a.idle_s > 0 else None
        with tempfile.TemporaryDirectory(prefix="pdbench-scale-") as out:
            with profiled(a.profile):
                runs.append(measure(config(a.nodes, a.cells, a.requests, fresh=False), cluster.address, Path(out), floor))
            if fresh_cells:
                runs.append(measure(config(a.nodes, fresh_cells, a.requests, fresh=True), cluster.address, Path(out), floor))
    finally:
        ray.shutdown()
        cluster.shutdown()
    warm = runs[0]
    fresh = runs[1] if len(runs) > 1 else None
    ratio = (
        warm.fixed_s.p50 / fresh.fixed_s.p50
        if fresh is not None and warm.fixed_s is not None and fresh.fixed_s is not None and fresh.fixed_s.p50
        else None
    )
    result = {
        "evidence": "simulated",
        "nodes": a.nodes,
        "cells": a.cells,
        "requests_per_cell": a.requests,
        "cluster_start_s": start_s,
        "load_average_before": list(load0),
        "load_average_after": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "idle_floor": None if floor is None else asdict(floor),
        "runs": [asdict(r) for r in runs],
        "fixed_cost_warm_over_fresh_p50": ratio,
    }
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return result


def _s(sp: dict[str, float] | None) -> str:
    return "-" if sp is None else f"{sp['p50']:.3f}/{sp['p90']:.3f}/{sp['max']:.3f}"


def print_table(r: dict[str, Any]) -> None:
    print(f"simulated: {r['nodes']} virtual nodes of 1 CPU, {r['cells']} cells × {r['requests_per_cell']} requests")
    load = r["load_average_before"][0], r["load_average_after"][0]
    print(f"cluster start {r['cluster_start_s']:.1f} s; load average before {load[0]:.2f}, after {load[1]:.2f}")
    if (f := r["idle_floor"]) is not None:
        print(
            f"idle cluster: Ray's daemons {f['daemons_cores']:.2f} of {r['cpu_count']} cores; "
            f"an idle actor process {100 * f['actor_core_share']:.2f}% of a core ({f['actors_probed']} probed)"
        )
    for run in r["runs"]:
        print(
            f"\n{run['engines']} engines: {run['cells_ok']}/{run['cells']} cells ok in {run['wall_s']:.1f} s; "
            f"{run['engine_starts']} engine starts; {run['nodes_used']} nodes used; {run['cells_queued']} cells queued behind another"
        )
        print(
            f"  driver overhead: process CPU {run['driver_cpu_s']:.1f} s = {100 * run['driver_overhead_fraction']:.2f}% of wall, "
            f"{run['driver_cpu_per_cell_ms']:.1f} ms per cell; main thread by phase (s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in run["main_cpu_by_phase_s"].items())
        )
        print(
            f"  driver loop: busy {run['loop_busy_s']:.2f} s = {100 * run['loop_busy_fraction']:.2f}% of wall (starvation included); "
            f"outside the loop {run['outside_loop_s']:.1f} s"
        )
        print("  driver CPU by thread (s): " + ", ".join(f"{k} {v:.2f}" for k, v in run["driver_cpu_by_thread_s"].items()))
        print("  per cell p50/p90/max (s):")
        for k in ("scheduling_s", "scheduling_warm_s", "load_s", "fixed_s", "fixed_warm_s", "fixed_fresh_s"):
            print(f"    {k:<18} {_s(run[k])}")
        if run["fixed_warm_stages_p50_s"]:
            print("  warm fixed cost by stage, p50 (s): " + ", ".join(f"{k} {v:.3f}" for k, v in run["fixed_warm_stages_p50_s"].items()))
        print(
            f"  box CPU over the run: {100 * run['box_cpu_share_of_cores']:.0f}% of {os.cpu_count()} cores; by role (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in run["box_cpu_by_role_s"].items())
        )
        if run["idle_floor_share_of_cores"] is not None:
            print(
                f"  idle floor: the daemons and the run's {run['actor_processes']} actor processes doing nothing "
                f"= {100 * run['idle_floor_share_of_cores']:.0f}% of the box's cores"
            )
        cpn = list(run["cells_per_node"].values())
        if cpn:
            print(f"  cells per node: min {min(cpn)}, max {max(cpn)}")
    if r["fixed_cost_warm_over_fresh_p50"] is not None:
        print(f"\nfixed cost per cell, warm / fresh engines (p50): {r['fixed_cost_warm_over_fresh_p50']:.3f}")


if __name__ == "__main__":
    main()
