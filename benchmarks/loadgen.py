"""How fast can the load generator keep an open-loop schedule? Send lag per Poisson rate.

For each target and rate, pdbench's LoadGenerator actor sends `--seconds` worth of Poisson
arrivals (`--output-tokens` each) and the send lag (actual send − scheduled) is read from its
records, as summary.json would (analysis/metrics.py `schedule_metrics`). Targets:

- `null`: an actor that answers every request at once with one message (the generator's own limit)
- `simulated`: pdbench's simulated engine (default law), sharing the cores with the generator
- `groundtruth`: the loopback ground-truth HTTP server (benchmarks/groundtruth_server.py), over
  pdbench's HTTP client

Prints, per target and rate: achieved/scheduled rate, send lag p50/p99/max, whether the schedule
was kept (docs/metrics.md `schedule_kept`), the host's 1-minute load average (on a shared host the
tail is other work's), and per target the highest rate kept. Goal: 1,000 req/s against the null
engine with send lag p99 < 1 ms on 2 cores. `--profile RATE` also shows where the load
generator's process spends its CPU at that rate: per request, by thread (event loop, sender
thread, Ray's own threads, from /proc), and the Python threads' time by area (cProfile on CPU time).

    python benchmarks/loadgen.py [--targets null simulated groundtruth] [--rates 100 300 1000] [--profile 1000] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from actors.backends import ActorBackend
from actors.engine_actor import EngineActor
from actors.engines.spec import EngineConfig
from actors.loadgen import LoadGenerator
from actors.target import TargetSpec
from analysis.metrics import schedule_metrics
from analysis.records import measured, to_frame
from workloads.arrivals import Poisson
from workloads.lengths import Fixed
from workloads.requests import WorkloadSpec, synthetic_requests

ROOT = Path(__file__).resolve().parents[1]


@ray.remote(num_cpus=0)
class NullEntry:
    """Answers at once: one message with one token, finished. A plain generator on the actor's own
    thread: an async actor's hand-over to its event loop cost ~0.2 ms more CPU per request (0.85
    against 0.65 ms measured), on the cores the load generator shares."""

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {"token_ids": [0], "token_s": [0.0], "finished": True, "error": None, "server": {}}


@ray.remote(num_cpus=0)
class ProfiledLoadGenerator:
    """pdbench's load generator, run under cProfile in its own actor: where its process's time goes.

    Open-loop sends leave from a sender thread and replies are read on the event loop, so each of
    the two threads gets its own profile (cProfile sees one thread), and every thread's CPU time,
    Ray's own C++ threads included, is read from /proc per request."""

    async def run(self, entry: Any, requests: list, timeout_s: float) -> dict[str, Any]:
        lg = LoadGenerator.__ray_actor_class__()  # type: ignore[attr-defined]
        # CPU time per thread, not wall time: a sleeping sender or an idle loop waiting on epoll is no cost.
        loop_prof, sender_prof = cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)
        sender: set[int] = set()
        submit = ActorBackend.submit

        def profiled_submit(backend: ActorBackend, request: dict[str, Any]) -> Any:
            # The sends themselves (the thread's sleeps and spins show in its CPU time below).
            sender.add(threading.get_native_id())
            sender_prof.enable()
            try:
                return submit(backend, request)
            finally:
                sender_prof.disable()

        ActorBackend.submit = profiled_submit  # type: ignore[method-assign,assignment]  # this process is the profiler's alone
        before = _thread_cpu_s()
        loop_prof.enable()
        await lg.run(entry, requests, 1, timeout_s)
        loop_prof.disable()
        after = _thread_cpu_s()
        shares: dict[str, float] = {}
        for prof in (loop_prof, sender_prof):
            for (path, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
                shares[_area(path, func)] = shares.get(_area(path, func), 0.0) + tottime
        total = sum(shares.values())
        loop_id = threading.get_native_id()
        threads: dict[str, float] = {}
        for tid, cpu in after.items():
            role = "event loop (replies)" if tid == loop_id else "sender thread (sends)" if tid in sender else "Ray's other threads"
            threads[role] = threads.get(role, 0.0) + (cpu - before.get(tid, 0.0)) / len(requests) * 1e6
        return {
            "areas": {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "cpu_us_per_request": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
        }


def _thread_cpu_s() -> dict[int, float]:
    """CPU seconds of every thread of this process, by native thread id."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _area(path: str, func: str) -> str:
    if "_raylet" in func:
        return "ray: core worker (C++ calls)"
    if "/ray/" in path:
        if "object_ref_generator" in path:
            return "ray: streamed replies"
        if path.endswith(("actor.py", "signature.py", "tracing_helper.py")) or "cloudpickle" in path:
            return "ray: actor call submit"
        if "util/metrics" in path:
            return "ray: metrics"
        return "ray: other"
    if "/asyncio/" in path or path.endswith("selectors.py"):
        return "asyncio loop"
    if "/actors/" in path or "/workloads/" in path or "/analysis/" in path:
        return "pdbench: " + Path(path).stem
    return "other (C calls, stdlib)"


def run_rate(entry: Any, rate: float, seconds: float, output_tokens: int, vocab: int) -> dict[str, Any]:
    n = max(20, int(rate * seconds))
    spec = WorkloadSpec(
        num_requests=n, warmup_requests=0, input_len=Fixed(value=32), output_len=Fixed(value=output_tokens), arrival=Poisson(rate=rate)
    )
    recs = ray.get(LoadGenerator.options(num_cpus=0).remote().run.remote(entry, synthetic_requests(spec, vocab, seed=7), 1, 120.0))  # type: ignore[attr-defined]
    df = measured(to_frame(recs, cell_id="bench"))
    sch = schedule_metrics(df, rate)
    lag = sch["send_lag_s"]
    return {
        "rate_rps": rate,
        "requests": n,
        "failed": int((~df["ok"].astype(bool)).sum()),
        "scheduled_rate_rps": sch["scheduled_rate_rps"],
        "achieved_rate_rps": sch["achieved_rate_rps"],
        "send_lag_p50_ms": lag["p50"] * 1e3,
        "send_lag_p99_ms": lag["p99"] * 1e3,
        "send_lag_max_ms": lag["max"] * 1e3,
        "share_over_1ms": float((df["queue_delay_s"] > 0.001).mean()),
        "schedule_kept": sch["schedule_kept"],
        # The box's 1-minute load average after the rate ran: on a shared host, other work shows here.
        "host_load_1min": os.getloadavg()[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["null", "simulated", "groundtruth"], choices=["null", "simulated", "groundtruth"])
    p.add_argument("--rates", type=float, nargs="+", default=[100, 300, 1000])
    p.add_argument("--seconds", type=float, default=2.0, help="measured schedule length per rate")
    p.add_argument("--output-tokens", type=int, default=4)
    p.add_argument("--profile", type=float, default=None, help="also profile the load generator at this rate (null target)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    profile: dict[str, Any] | None = None
    if args.profile:
        n = max(20, int(args.profile * args.seconds))
        spec = WorkloadSpec(
            num_requests=n,
            warmup_requests=0,
            input_len=Fixed(value=32),
            output_len=Fixed(value=args.output_tokens),
            arrival=Poisson(rate=args.profile),
        )
        profiled: Any = ProfiledLoadGenerator.remote()  # type: ignore[attr-defined]
        profile = ray.get(profiled.run.remote(NullEntry.remote(), synthetic_requests(spec, 1000, seed=7), 120.0))  # type: ignore[attr-defined,assignment]
    results: dict[str, list[dict[str, Any]]] = {}
    for target in args.targets:
        server = None
        if target == "null":
            entry, vocab = NullEntry.remote(), 1000  # type: ignore[attr-defined]
        elif target == "simulated":
            entry = EngineActor.options(num_cpus=0).remote(EngineConfig(kind="simulated").model_dump())  # type: ignore[attr-defined]
            vocab = ray.get(entry.start.remote())["vocab_size"]
        else:
            server = subprocess.Popen(
                [sys.executable, str(ROOT / "benchmarks" / "groundtruth_server.py")], stdout=subprocess.PIPE, text=True
            )
            assert server.stdout is not None  # stdout=PIPE
            port = int(server.stdout.readline().split()[1])
            entry, vocab = TargetSpec(base_url=f"http://127.0.0.1:{port}", model="gt", vocab_size=1000), 1000
        try:
            results[target] = [run_rate(entry, r, args.seconds, args.output_tokens, vocab) for r in sorted(args.rates)]
        finally:
            if server is not None:
                server.terminate()
                server.wait()
            elif target == "simulated":
                ray.get(entry.shutdown.remote())
    highest = {t: max((r["rate_rps"] for r in rows if r["schedule_kept"]), default=None) for t, rows in results.items()}
    null_1000 = next((r for r in results.get("null", []) if r["rate_rps"] == 1000), None)
    goal = "goal null engine 1,000 req/s send lag p99 < 1 ms: " + (
        "not run"
        if null_1000 is None
        else ("met" if null_1000["send_lag_p99_ms"] < 1 else "NOT met") + f" ({null_1000['send_lag_p99_ms']:.3f} ms)"
    )
    if args.json:
        print(json.dumps({"results": results, "highest_rate_kept_rps": highest, "goal": goal, "profile": profile}, indent=1))
        return
    head = ("target", "rate", "sched", "sent", "lag p50 ms", "p99", "max", ">1ms", "kept", "failed", "load")
    widths = (12, 7, 8, 8, 10, 8, 8, 6, 5, 6, 5)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for t, rows in results.items():
        for r in rows:
            cells = (
                t,
                f"{r['rate_rps']:.0f}",
                f"{r['scheduled_rate_rps']:.1f}",
                f"{r['achieved_rate_rps']:.1f}",
                f"{r['send_lag_p50_ms']:.3f}",
                f"{r['send_lag_p99_ms']:.3f}",
                f"{r['send_lag_max_ms']:.3f}",
                f"{r['share_over_1ms']:.1%}",
                "yes" if r["schedule_kept"] else "NO",
                str(r["failed"]),
                f"{r['host_load_1min']:.1f}",
            )
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        print(f"{t:>12} highest rate with the schedule kept: {highest[t]}")
    print(goal)
    if profile:
        print(f"where the load generator's time goes at {args.profile:.0f} req/s (null target)")
        print("  CPU per request, by thread:")
        for role, us in profile["cpu_us_per_request"].items():
            print(f"  {us:>8.0f} us  {role}")
        print("  share of the Python threads' profiled time, by area:")
        for area, share in profile["areas"].items():
            print(f"  {share:>8.1%}  {area}")


if __name__ == "__main__":
    main()
