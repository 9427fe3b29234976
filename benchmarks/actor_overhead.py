"""Reference-engine throughput: driven in-process vs through pdbench's Ray actor path.

Same engine config, same requests, same closed-loop concurrency; each path warms its fresh
engine with one wave of requests before the timed run, and rounds alternate the two paths so
background noise hits both. Prints each round and the ratio actor / in-process (goal ≥ 0.95).

    python benchmarks/actor_overhead.py [--requests 48] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from actors.engines import EngineConfig, EngineRequest, build_engine
from actors.engines.models import TINY_QWEN3
from workloads.arrivals import ClosedLoop
from workloads.lengths import Fixed, Uniform
from workloads.requests import WorkloadSpec, synthetic_requests


def engine_config(tmp: Path) -> EngineConfig:
    # Wider and deeper than the test model, so a decode step is real work (a few ms on one core).
    arch = {
        **TINY_QWEN3,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    path = tmp / "bench-model.json"
    path.write_text(json.dumps(arch))
    return EngineConfig(kind="reference", model=str(path), max_batch_size=32, cpu_threads=1)


async def in_process(cfg: EngineConfig, warm, reqs, concurrency: int) -> float:
    engine = build_engine(cfg)
    await engine.start()

    async def drive(batch) -> int:
        todo = list(reversed(batch))
        tokens = 0

        async def user():
            nonlocal tokens
            while todo:
                r = todo.pop()
                async for d in engine.generate(EngineRequest(r.request_id, list(r.prompt_token_ids), r.max_tokens)):
                    tokens += len(d.token_ids)

        await asyncio.gather(*(user() for _ in range(concurrency)))
        return tokens

    await drive(warm)  # a fresh engine's first steps are slower on either path
    t0 = time.monotonic()
    tokens = await drive(reqs)
    dt = time.monotonic() - t0
    await engine.shutdown()
    return tokens / dt


def through_ray(cfg: EngineConfig, warm, reqs, concurrency: int) -> float:
    import ray

    from actors.engine_actor import EngineActor
    from actors.loadgen import LoadGenerator

    engine = EngineActor.options(num_cpus=1).remote(cfg.model_dump())  # type: ignore[attr-defined]  # ray actor class
    ray.get(engine.start.remote())
    lg = LoadGenerator.remote()  # type: ignore[attr-defined]  # ray actor class
    ray.get(lg.run.remote(engine, warm, concurrency))
    t0 = time.monotonic()
    recs = ray.get(lg.run.remote(engine, reqs, concurrency))
    dt = time.monotonic() - t0
    ray.get(engine.shutdown.remote())
    ray.kill(engine)
    ray.kill(lg)
    assert all(r["ok"] for r in recs), [r["error"] for r in recs if not r["ok"]]
    return sum(len(r["output_token_ids"]) for r in recs) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = engine_config(Path(tmp))
        spec = WorkloadSpec(
            num_requests=args.requests,
            warmup_requests=0,
            input_len=Uniform(low=32, high=256),
            output_len=Fixed(value=args.output_len),
            arrival=ClosedLoop(concurrency=args.concurrency),
        )
        reqs = synthetic_requests(spec, vocab_size=TINY_QWEN3["vocab_size"], seed=0)
        warm = reqs[: args.concurrency]
        ratios = []
        print(f"{'round':>5} {'in-process tok/s':>17} {'ray actor tok/s':>16} {'ratio':>7}")
        for i in range(args.rounds):
            a = asyncio.run(in_process(cfg, warm, reqs, args.concurrency))
            b = through_ray(cfg, warm, reqs, args.concurrency)
            ratios.append(b / a)
            print(f"{i:>5} {a:>17.1f} {b:>16.1f} {b / a:>7.3f}")
    med = statistics.median(ratios)
    print(f"median ratio (ray actor / in-process): {med:.3f}  (goal >= 0.95)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
