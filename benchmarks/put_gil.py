"""What a `ray.put` in one thread costs the Python code of the other threads of its process.

The vLLM connector puts the KV from threads inside the engine's process, beside vLLM's step loop,
which is Python and needs the GIL to launch every kernel. This runs a stand-in step loop (a tight
Python loop that records the gap between its iterations) alone, then beside a thread that puts
`--mib` MiB objects into the object store back to back, then beside a thread that has a putter actor
write the same bytes from shared memory (`kv_transfer.put_process`, actors/kv/putter.py: this process
only calls the actor and waits for its reply), then beside a thread that does the same copy with
numpy (`np.copyto`, which releases the GIL), and, as the control, with the loop in another process
beside the putting thread (no shared GIL: what is left is CPU and memory bandwidth). It prints, side
by side, the time the loop was held (gaps over 1 ms, summed) as a share of the wall, the longest gap,
and how many objects were put meanwhile.

Measured on the 2-core CI box (Ray 2.60, 64 MiB, 0.5 ms switch interval): beside `ray.put` the loop
was held 30-54% of the wall, in gaps up to 65-80 ms; in another process beside the same puts it was
held about as much (two cores shared by everything) but never longer than ~7 ms at a time; beside
`np.copyto`, about 1%, at most 4-6 ms. The long stalls are the GIL. Ray writes the object's bytes
into shared memory while it holds the GIL, so every byte the connector puts stalls the engine's
step loop for as long as the copy takes: the likeliest reason the prefill engine's prefill_s rises
with pdbench's connector (docs/evidence/e3b-vllm-qwen3-8b-2xh200-rdt: 121 ms against 88 with vLLM's
NixlConnector, which copies on the GPU without the interpreter).

Through the putter (same box, 64 MiB, five runs): with the box otherwise quiet (np.copyto's row held
under a third of the wall) the loop was held 10-12% of the wall with longest gaps of 4.5-8 ms, where
beside `ray.put` in the same runs it was held 34-41% with gaps of 159-162 ms; in three runs on a
loaded box, 15-45% against 60-74%, and 60-77 ms against 161-277 ms (the other-process control's gaps
reached 39-46 ms there: the scheduler, not the GIL). Objects went at 0.31-1.07x `ray.put`'s rate:
the putter's copy competes for the two cores with the spinning loop (and the other tenants) instead
of running while the loop waits for the GIL.

    python benchmarks/put_gil.py [--mib 64] [--seconds 2] [--switch-ms 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from actors.kv import putter

_HELD_S = 1e-3  # a gap longer than this is the loop waiting for the GIL, not its own iteration


def loop_gaps(seconds: float) -> dict[str, float]:
    """Run the stand-in step loop for `seconds`: its held time (gaps > 1 ms) over wall, and its longest gap."""
    held, worst, t0 = 0.0, 0.0, time.perf_counter()
    last = t0
    while (now := time.perf_counter()) - t0 < seconds:
        gap = now - last
        if gap > _HELD_S:
            held += gap
        worst = max(worst, gap)
        last = now
    wall = time.perf_counter() - t0
    return {"held_share": held / wall, "longest_gap_ms": worst * 1e3}


def beside(work: Callable[[], object], seconds: float) -> dict[str, float]:
    """The loop's gaps while `work` runs back to back in another thread, and how often it ran."""
    stop, done = threading.Event(), [0]

    def run() -> None:
        while not stop.is_set():
            work()
            done[0] += 1

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        out = loop_gaps(seconds)
    finally:
        stop.set()
        th.join()
    return {**out, "ops": done[0]}


def _loop_elsewhere(seconds: float, out: Any) -> None:
    out.put(loop_gaps(seconds))


def elsewhere(work: Callable[[], object], seconds: float) -> dict[str, float]:
    """The loop in another process while `work` runs in a thread of this one: what the put costs
    without the GIL (CPU and memory bandwidth only), the control for `beside`."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_loop_elsewhere, args=(seconds, out))
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            work()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    proc.start()
    try:
        res: dict[str, float] = out.get(timeout=seconds + 60)
    finally:
        stop.set()
        th.join()
        proc.join()
    return {**res, "ops": 0}


def through_putter(mib: int, seconds: float) -> dict[str, float]:
    """The loop beside a thread that has this process's putter (kv_transfer.put_process,
    actors/kv/putter.py) write the same bytes into the store from shared memory: what is left in
    this process is the actor call and its wait."""
    client = putter.client(1)
    buf = client.take(mib << 20, pinned=False)
    buf.fill_(1)
    try:
        for _ in range(3):  # the putter's first touch of the segment and of the store's pages
            client.put(buf)
        return beside(lambda: client.put(buf), seconds)
    finally:
        client.give(buf, pinned=False)
        putter.close()


def measure(mib: int, seconds: float) -> dict[str, dict[str, float]]:
    src = np.ones(mib << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    for _ in range(3):  # touch the store's pages first: a cold put measures page faults
        ray.put(src)
    return {
        "alone": {**loop_gaps(seconds), "ops": 0},
        "ray_put": beside(lambda: ray.put(src), seconds),
        "putter": through_putter(mib, seconds),
        "ray_put_other_process": elsewhere(lambda: ray.put(src), seconds),
        "np_copyto": beside(lambda: np.copyto(dst, src), seconds),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="size of each object put (the connector's default layer group)")
    ap.add_argument("--seconds", type=float, default=2.0, help="how long the loop runs in each setting")
    ap.add_argument(
        "--switch-ms",
        type=float,
        default=0.5,
        help="Python's thread switch interval, as the connector sets it in the engine (kv_transfer.gil_switch_interval_ms)",
    )
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    sys.setswitchinterval(args.switch_ms / 1e3)
    ray.init(address="local", include_dashboard=False, object_store_memory=max(1 << 30, 8 * (args.mib << 20)), log_to_driver=False)
    res = measure(args.mib, args.seconds)
    ray.shutdown()
    for name, r in res.items():
        print(f"{name:>10}: loop held {r['held_share']:6.1%} of the wall, longest gap {r['longest_gap_ms']:7.2f} ms, {int(r['ops'])} ops")
    put, other, via = res["ray_put"], res["ray_put_other_process"], res["putter"]
    print(f"longest gap beside ray.put / in another process beside it: {put['longest_gap_ms'] / max(other['longest_gap_ms'], 1e-3):.1f}x")
    print(f"held share beside ray.put / beside np.copyto: {put['held_share'] / max(res['np_copyto']['held_share'], 1e-4):.1f}x")
    print(f"longest gap beside ray.put / beside puts through the putter: {put['longest_gap_ms'] / max(via['longest_gap_ms'], 1e-3):.1f}x")
    print(f"held share beside ray.put / beside puts through the putter: {put['held_share'] / max(via['held_share'], 1e-4):.1f}x")
    print(f"bytes put per second, putter / ray.put: {via['ops'] / max(put['ops'], 1):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "seconds": args.seconds, "switch_ms": args.switch_ms, **res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
