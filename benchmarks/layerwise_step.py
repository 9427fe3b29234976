"""What layer-wise saves cost the prefill engine's step loop, and what they gain, side by side.

The vLLM connector's worker side (actors/kv/jobs.py `ConnectorWorker`, with the real transport
into the Ray object store) is driven by a stand-in for vLLM's step loop: a forward pass of 36
layers, each doing a fixed amount of Python work (vLLM launches its kernels from Python), writing
its KV into a paged CPU cache, then calling the connector's `save_kv_layer` hook. The same steps
run with `kv_transfer.save: after_forward` and `layerwise`, alternating, and print:

- forward wall (median per step) with layer-wise saves over after-forward: what the senders'
  threads and the per-layer gathers take from the step loop (GIL included);
- the step loop's time inside the connector (`blocked_s`) per step, both ways;
- forward end -> every group published (median): what the pipelining gains.

On a GPU the forward's layers run on the device and the hooks only queue work, so absolute
numbers differ; what transfers is the step loop's share. CPU only, a few seconds per config:

    python benchmarks/layerwise_step.py [--steps 20] [--saves 1 4] [--tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import ray
import torch

from actors.kv.blocks import StepPlan, Transfer
from actors.kv.directory import directory_actor
from actors.kv.jobs import ConnectorWorker
from actors.kv.spec import KVTransferConfig

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 36, 8, 128, 16
LAYER_WORK = 200  # small tensor ops per layer: the forward's own Python time


def _layer_work(x: torch.Tensor) -> torch.Tensor:
    for _ in range(LAYER_WORK):
        x = x * 1.0001 + 0.0001
    return x


def _step(worker: ConnectorWorker, caches: list[torch.Tensor], plan: StepPlan, x: torch.Tensor) -> float:
    """One forward pass with the connector's hooks; returns its wall time."""
    t0 = time.perf_counter()
    worker.start_loads(plan)
    for li, cache in enumerate(caches):
        x = _layer_work(x)
        for t in plan.saves:
            cache[t.block_ids] = float(li)
        worker.layer_saved(li)
    worker.start_saves(plan)
    return time.perf_counter() - t0


def _published(directory: Any, keys: list[str], groups_of: dict[str, int]) -> None:
    while any(ray.get(directory.status.remote(k))["registered"] < groups_of[k] for k in keys):
        time.sleep(0.0005)


def run(save: str, steps: int, saves: int, tokens: int, store_name: str) -> dict[str, float]:
    cfg = KVTransferConfig(save=save, put_threads=2, checksum=False, max_group_bytes=8 << 20)  # type: ignore[arg-type]
    directory = directory_actor(store_name)
    worker = ConnectorWorker(cfg, directory, engine=f"bench/{save}")
    blocks_per_req = tokens // BLOCK
    caches = [torch.zeros(saves * blocks_per_req * 2, 2, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
    worker.register(caches, 0)
    layer_bytes = blocks_per_req * caches[0][0].numel() * 2
    groups = -(-LAYERS // max(1, cfg.max_group_bytes // layer_bytes))
    x = torch.ones(64)
    walls, lags, blocked = [], [], []
    for s in range(steps):
        span = [range(k * blocks_per_req, (k + 1) * blocks_per_req) for k in range(saves)]
        plan = StepPlan(saves=[Transfer(f"s{s}r{k}/{save}", f"s{s}r{k}", list(span[k]), tokens) for k in range(saves)])
        b0 = worker.blocked_s
        walls.append(_step(worker, caches, plan, x))
        blocked.append(worker.blocked_s - b0)
        t_end = time.perf_counter()
        keys = [t.key for t in plan.saves]
        _published(directory, keys, {k: groups for k in keys})
        lags.append(time.perf_counter() - t_end)
        while worker.pending()["saves"]:  # vLLM reports the finished requests; the saves then release
            worker.finished({t.request_id for t in plan.saves})
            time.sleep(0.0005)
        for k in keys:
            ray.get(directory.drop.remote(k))
    worker.shutdown()
    ray.kill(directory)
    return {"forward_s": statistics.median(walls), "blocked_s": statistics.median(blocked), "end_to_published_s": statistics.median(lags)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--saves", type=int, nargs="+", default=[1, 4], help="prompts saved per step")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per saved prompt")
    args = ap.parse_args()
    ray.init(address="local", namespace="pdbench", include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    print(f"{LAYERS} layers, {args.tokens} tokens per saved prompt, median of {args.steps} steps (ms)")
    print(f"{'saves':>6} {'mode':>14} {'forward':>9} {'in connector':>13} {'end->published':>15}")
    for n in args.saves:
        res = {m: run(m, args.steps, n, args.tokens, f"bench-layerwise-{m}-{n}") for m in ("after_forward", "layerwise")}
        for m, r in res.items():
            print(f"{n:>6} {m:>14} {r['forward_s'] * 1e3:>9.2f} {r['blocked_s'] * 1e3:>13.2f} {r['end_to_published_s'] * 1e3:>15.2f}")
        a, lw = res["after_forward"], res["layerwise"]
        print(
            f"{n:>6} {'ratio lw/af':>14} {lw['forward_s'] / a['forward_s']:>9.2f} {'':>13} "
            f"{lw['end_to_published_s'] / a['end_to_published_s']:>15.2f}"
        )


if __name__ == "__main__":
    main()
