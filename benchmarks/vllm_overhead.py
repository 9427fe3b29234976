"""pdbench's Ray-actor path vs vLLM's own offline `LLM.generate`, same workload, same GPU.

Run on a GPU node (vllm installed). Both sides use the same engine arguments (pdbench's, from
actors/engines/vllm_engine.py), dummy weights of the named architecture, token-id prompts,
greedy, fixed output lengths. The offline engine runs first and is shut down before the actor
path starts, so each has the whole GPU. Prints output tokens/s of each and the ratio (goal ≥ 0.95).

    python benchmarks/vllm_overhead.py --model qwen3-8b --prompts 64 --input-len 1024 --output-len 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from actors.engines.models import resolve_model
from actors.engines.spec import EngineConfig
from actors.engines.vllm_engine import engine_args, materialise
from workloads.arrivals import ClosedLoop
from workloads.lengths import Fixed
from workloads.requests import WorkloadSpec, synthetic_requests


def offline(cfg: EngineConfig, reqs) -> tuple[float, list[list[int]]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    raw, _ = resolve_model(cfg.model)
    assert raw is not None  # main() refused a model that is not an architecture
    llm = LLM(**engine_args(cfg, materialise(raw), dummy=True))
    prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in reqs]
    sp = SamplingParams(max_tokens=reqs[0].max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
    t0 = time.monotonic()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.monotonic() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    llm.llm_engine.engine_core.shutdown()  # frees the GPU for the actor path (and lets us exit)
    del llm
    gc.collect()
    return sum(map(len, tokens)) / dt, tokens


def actor_path(cfg: EngineConfig, reqs, warm) -> tuple[float, float, list[list[int]]]:
    """Output tok/s over the driver's wall clock around the load generator's run, and over the
    load generator's own measured window (first send → last token), which is what pdbench reports."""
    import ray

    from actors.engine_actor import EngineActor
    from actors.loadgen import LoadGenerator

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    engine = EngineActor.options(num_cpus=1, num_gpus=1).remote(cfg.model_dump())  # type: ignore[attr-defined]  # ray actor class
    ray.get(engine.start.remote())
    lg = LoadGenerator.remote()  # type: ignore[attr-defined]  # ray actor class
    ray.get(lg.run.remote(engine, warm, len(warm)))
    t0 = time.monotonic()
    recs = ray.get(lg.run.remote(engine, reqs, len(reqs)))
    dt = time.monotonic() - t0
    ray.get(engine.shutdown.remote())
    ray.shutdown()
    assert all(r["ok"] for r in recs), [r["error"] for r in recs if not r["ok"]][:3]
    by_id = {r["request_id"]: r["output_token_ids"] for r in recs}
    tokens = sum(len(t) for t in by_id.values())
    window = max(r["t_chunks"][-1] for r in recs) - min(r["t_sent"] for r in recs)
    return tokens / dt, tokens / window, [by_id[r.request_id] for r in reqs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs) on both sides")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    cfg = EngineConfig(
        kind="vllm",
        model=args.model,
        dtype="bfloat16",
        max_model_len=args.input_len + args.output_len + 16,
        max_batch_size=max(args.prompts, 8),
        vllm={"gpu_memory_utilization": 0.85, "enforce_eager": args.eager},
    )
    spec = WorkloadSpec(
        num_requests=args.prompts,
        warmup_requests=4,
        input_len=Fixed(value=args.input_len),
        output_len=Fixed(value=args.output_len),
        arrival=ClosedLoop(concurrency=args.prompts),
    )
    raw, _ = resolve_model(args.model)
    if raw is None:
        raise SystemExit(f"--model {args.model}: not an architecture pdbench knows (configs/models/ name or config.json path)")
    allreqs = synthetic_requests(spec, vocab_size=raw["vocab_size"], seed=0)
    warm, reqs = allreqs[:4], allreqs[4:]
    a, toks_a = offline(cfg, reqs)
    b_wall, b, toks_b = actor_path(cfg, reqs, warm)
    import torch

    res = {
        "gpu": torch.cuda.get_device_name(0),
        "model": args.model,
        "workload": f"{args.prompts} prompts x {args.input_len} tokens, {args.output_len} output tokens, greedy",
        "cuda_graphs": not args.eager,
        "offline_output_tok_s": a,
        "actor_output_tok_s": b,
        "actor_output_tok_s_driver_wall": b_wall,
        "ratio_actor_over_offline": b / a,
        "ratio_driver_wall": b_wall / a,
        "greedy_tokens_identical": toks_a == toks_b,
    }
    print(json.dumps(res, indent=2))
    print(
        f"ratio (pdbench Ray actor path / vLLM offline LLM.generate): {b / a:.3f}  (goal >= 0.95); "
        f"over the driver's wall clock instead: {b_wall / a:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
