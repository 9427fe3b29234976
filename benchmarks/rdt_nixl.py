"""Ray Direct Transport over NIXL: what the receiver's buffers cost, side by side in one run.

A sender actor puts `--groups` tensors of `--mib` MiB each by NIXL, from one registered pool as
pdbench's `ray-rdt-nixl` sender does (actors/kv/rdt.py); a receiver actor reads each batch one of
two ways, the modes alternating batch by batch:

- `fresh`: onto its device (`set_target_device_for_ref`): for every get Ray allocates a buffer,
  registers it with NIXL and deregisters it afterwards (pdbench's receiver at bac2b3e, which moved
  1.2 GB in 2.7 s between two engines on one H200);
- `registered`: into buffers registered with NIXL once and reused (`register_nixl_memory`,
  `set_target_for_ref`; actors/kv/rdt.py ReceiveBuffers).

Prints the read time and GB/s per mode (medians over `--repeats`) and registered ÷ fresh, after
checking every byte that arrived. `--device cuda` on a GPU node: both actors share GPU 0 unless
two GPUs are visible. Set UCX_LOG_LEVEL=info to have UCX log the transports it picks.

    python benchmarks/rdt_nixl.py [--device cpu] [--groups 8] [--mib 64] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

MODES = ("fresh", "registered")


@ray.remote
class Sender:
    def __init__(self, device: str, pool_bytes: int) -> None:
        from actors.kv import rdt

        rdt.start_tensor_transport("nixl")
        self.device, self.pool_bytes = torch.device(device), pool_bytes

    def make(self, groups: int, nbytes: int, seed: int) -> list[Any]:
        from actors.kv import rdt

        deadline = time.monotonic() + 60
        return [
            rdt.put(torch.full((nbytes,), (seed + i) % 251, dtype=torch.uint8, device=self.device), self.pool_bytes, deadline)
            for i in range(groups)
        ]


@ray.remote
class Receiver:
    def __init__(self, device: str) -> None:
        from actors.kv import rdt

        rdt.start_tensor_transport("nixl")
        self.device = torch.device(device)
        self.buffers = rdt.ReceiveBuffers()

    def read(self, refs: list[Any], mode: str, seed: int) -> float:
        from ray.experimental import set_target_device_for_ref, set_target_for_ref

        nbytes = None
        held = []
        for ref in refs:
            if mode == "fresh":
                set_target_device_for_ref(ref, str(self.device))
            else:
                nbytes = nbytes or self._nbytes(ref)
                held.append(self.buffers.take(self.device, nbytes))
                set_target_for_ref(ref, [held[-1]])
        t0 = time.perf_counter()
        values = ray.get(refs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        for i, v in enumerate(values):
            t = v if isinstance(v, torch.Tensor) else v[0]
            if int(t[0]) != (seed + i) % 251 or int(t[-1]) != (seed + i) % 251 or t.device.type != self.device.type:
                raise AssertionError(f"{mode}: group {i} arrived wrong")
        for b in held:
            self.buffers.give(b, None)
        return took

    def _nbytes(self, ref: Any) -> int:
        meta = ray.worker.global_worker.rdt_manager.get_rdt_metadata(ref.hex())
        ((shape, _),) = meta.tensor_transport_meta.tensor_meta
        return int(shape[0])

    def registered_buffers(self) -> int:
        return self.buffers.count()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = args.mib << 20
    two = args.device == "cuda" and torch.cuda.device_count() >= 2
    share = 1.0 if two else 0.5
    gpu = {"num_gpus": share} if args.device == "cuda" else {}
    sender = Sender.options(**gpu).remote(args.device, nbytes * args.groups * 2)  # type: ignore[attr-defined]
    receiver = Receiver.options(**gpu).remote(args.device)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.repeats + 1):  # the first round of each mode warms up (agents, first registrations)
        for m in MODES if r % 2 == 0 else MODES[::-1]:
            seed = r * 7 + len(m)
            refs = ray.get(sender.make.remote(args.groups, nbytes, seed))
            took = ray.get(receiver.read.remote(refs, m, seed))
            del refs
            if r:
                times[m].append(took)
    buffers = ray.get(receiver.registered_buffers.remote())
    for a in (sender, receiver):
        ray.kill(a)  # each holds a NIXL agent whose progress thread keeps a core busy
    gb = args.groups * nbytes / 1e9
    rows = {m: {"read_s_median": statistics.median(v), "gb_s": gb / statistics.median(v), "reads_s": v} for m, v in times.items()}
    return {
        "device": args.device,
        "gpus_used": 2 if two else (1 if args.device == "cuda" else 0),
        "groups": args.groups,
        "group_bytes": nbytes,
        "repeats": args.repeats,
        "modes": rows,
        "registered_over_fresh_speed": rows["fresh"]["read_s_median"] / rows["registered"]["read_s_median"],
        "receiver_registered_buffers": buffers,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--groups", type=int, default=8, help="tensors per batch (a KV transfer's layer groups)")
    p.add_argument("--mib", type=int, default=64, help="MiB per tensor (pdbench's default layer group)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per mode, after one warm-up each")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4)
    try:
        out = measure(args)
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    gb = args.groups * (args.mib << 20) / 1e9
    print(f"{args.groups} x {args.mib} MiB ({gb:.2f} GB) by NIXL on {args.device}, {out['gpus_used']} GPU(s); medians of {args.repeats}")
    for m, r in out["modes"].items():
        print(f"  {m:<11} read {r['read_s_median'] * 1e3:8.1f} ms  {r['gb_s']:6.2f} GB/s")
    n = out["receiver_registered_buffers"]
    print(f"registered / fresh speed: {out['registered_over_fresh_speed']:.2f}x ({n} receive buffers registered)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
