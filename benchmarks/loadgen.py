"""How fast can the load generator keep an open-loop schedule? Send lag per Poisson rate.

For each target and rate, pdbench's LoadGenerator actor sends `--seconds` worth of Poisson
arrivals (`--output-tokens` each) and the send lag (actual send − scheduled) is read from its
records, as summary.json would (analysis/metrics.py `schedule_metrics`). Targets:

- `null`: an actor that answers every request at once with one message (the generator's own limit)
- `simulated`: pdbench's simulated engine (default law), sharing the cores with the generator
- `groundtruth`: the loopback ground-truth HTTP server (benchmarks/groundtruth_server.py), over
  pdbench's HTTP client

Prints, per target and rate: achieved/scheduled rate, send lag p50/p99/max, whether the schedule
was kept (docs/metrics.md `schedule_kept`), and per target the highest rate kept. Goal: 1,000 req/s
against the null engine with send lag p99 < 1 ms on 2 cores. `--profile RATE` also shows where
the load generator's process spends its time at that rate (cProfile, grouped by area).

    python benchmarks/loadgen.py [--targets null simulated groundtruth] [--rates 100 300 1000] [--profile 1000] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import ray

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
    """Answers at once: one message with one token, finished."""

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"token_ids": [0], "token_s": [0.0], "finished": True, "error": None, "server": {}}


@ray.remote(num_cpus=0)
class ProfiledLoadGenerator:
    """pdbench's load generator, run under cProfile in its own actor: where its process's time goes."""

    async def run(self, entry: Any, requests: list, timeout_s: float) -> dict[str, float]:
        lg = LoadGenerator.__ray_actor_class__()
        prof = cProfile.Profile()
        prof.enable()
        await lg.run(entry, requests, 1, timeout_s)
        prof.disable()
        shares: dict[str, float] = {}
        for (path, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
            shares[_area(path, func)] = shares.get(_area(path, func), 0.0) + tottime
        total = sum(shares.values())
        return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


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
    spec = WorkloadSpec(num_requests=n, warmup_requests=0, input_len=Fixed(value=32), output_len=Fixed(value=output_tokens), arrival=Poisson(rate=rate))
    recs = ray.get(LoadGenerator.options(num_cpus=0).remote().run.remote(entry, synthetic_requests(spec, vocab, seed=7), 1, 120.0))
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
    profile = None
    if args.profile:
        n = max(20, int(args.profile * args.seconds))
        spec = WorkloadSpec(num_requests=n, warmup_requests=0, input_len=Fixed(value=32), output_len=Fixed(value=args.output_tokens), arrival=Poisson(rate=args.profile))
        profile = ray.get(ProfiledLoadGenerator.remote().run.remote(NullEntry.remote(), synthetic_requests(spec, 1000, seed=7), 120.0))
    results: dict[str, list[dict[str, Any]]] = {}
    for target in args.targets:
        server = None
        if target == "null":
            entry, vocab = NullEntry.remote(), 1000
        elif target == "simulated":
            entry = EngineActor.options(num_cpus=0).remote(EngineConfig(kind="simulated").model_dump())
            vocab = ray.get(entry.start.remote())["vocab_size"]
        else:
            server = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "groundtruth_server.py")], stdout=subprocess.PIPE, text=True)
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
    goal = (
        "goal null engine 1,000 req/s send lag p99 < 1 ms: "
        + ("not run" if null_1000 is None else ("met" if null_1000["send_lag_p99_ms"] < 1 else "NOT met") + f" ({null_1000['send_lag_p99_ms']:.3f} ms)")
    )
    if args.json:
        print(json.dumps({"results": results, "highest_rate_kept_rps": highest, "goal": goal, "profile": profile}, indent=1))
        return
    print(f"{'target':>12} {'rate':>7} {'sched':>8} {'sent':>8} {'lag p50 ms':>10} {'p99':>8} {'max':>8} {'>1ms':>6} {'kept':>5} {'failed':>6}")
    for t, rows in results.items():
        for r in rows:
            print(
                f"{t:>12} {r['rate_rps']:>7.0f} {r['scheduled_rate_rps']:>8.1f} {r['achieved_rate_rps']:>8.1f} {r['send_lag_p50_ms']:>10.3f} "
                f"{r['send_lag_p99_ms']:>8.3f} {r['send_lag_max_ms']:>8.3f} {r['share_over_1ms']:>6.1%} {'yes' if r['schedule_kept'] else 'NO':>5} {r['failed']:>6}"
            )
        print(f"{t:>12} highest rate with the schedule kept: {highest[t]}")
    print(goal)
    if profile:
        print(f"where the load generator's time goes at {args.profile:.0f} req/s (null target, share of profiled CPU time):")
        for area, share in profile.items():
            print(f"  {share:>6.1%}  {area}")


if __name__ == "__main__":
    main()
