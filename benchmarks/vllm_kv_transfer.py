"""KV transfer backends between two vLLM engines vs plain copies of the same bytes (two GPUs).

`--backend` names one or more KV backends (kv_transfer.backend), each run in turn on the same
model, prompts and GPUs: `ray-object-store` (RayObjectStoreConnector), `ray-rdt-nixl` (the same
connector, each layer group moved GPU to GPU by Ray Direct Transport over NIXL, the same records
and stages), `nixl-vllm` (vLLM's own
NixlConnector; pdbench sees its transfer time as the decode engine's queued → scheduled, vLLM's
clock, and its bytes only as tokens × KV bytes per token). A backend that cannot run here is
printed as refused, with its reason. Two baselines of the same bytes, measured once beside them:
pinned (GPU 0 → pinned host → GPU 1) and peer (GPU 0 → GPU 1 directly, peer access or not).

For ray-object-store and ray-rdt-nixl:

A vLLM prefill engine (GPU 0) and decode engine (GPU 1) move each request's prompt KV through the
Ray object store; the connector's own records give bytes and stage times. Requests run one at a
time, so each transfer is measured alone. Two times per transfer:
- send + receive wall (`send_s + total_s`): the sender's publish, then the receiver's whole
  receive, as if one waited for the other (the definition of earlier rounds);
- KV ready → KV injected (`ready_to_injected_s`): from the prefill engine's forward having written
  the KV to the decode engine's blocks holding it, CLOCK_MONOTONIC of two processes on one host;
  the receiver follows the sender group by group, so this is the path's real latency.
The baseline copies the same number of bytes GPU 0 → pinned host → GPU 1 with plain torch copies
(serial D2H then H2D). Prints per-stage medians and both ratios (baseline time ÷ path time).

    PDBENCH_OBJECT_STORE_GB=8 python benchmarks/vllm_kv_transfer.py --model qwen3-8b --tokens 8192 --requests 6
    python benchmarks/vllm_kv_transfer.py --backend ray-object-store ray-rdt-nixl nixl-vllm --json /tmp/kv.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

STAGES = ("extract_s", "put_s", "wait_ref_s", "fetch_s", "get_s", "inject_s")


def pinned_copy_s(nbytes: int, repeats: int = 5) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1" if torch.cuda.device_count() > 1 else "cuda:0")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.copy_(src)
        dst.copy_(host)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peer_copy_s(nbytes: int, repeats: int = 5) -> float | None:
    """GPU 0 → GPU 1 in one copy (CUDA peer access where the GPUs have it); None on one GPU."""
    import torch

    if torch.cuda.device_count() < 2:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from actors.handoffs import KV_BACKENDS

    vllm_backends = [b for b in KV_BACKENDS.names() if "vllm" in KV_BACKENDS.get(b).engines]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backend",
        nargs="+",
        choices=vllm_backends,
        default=["ray-object-store"],
        help="KV transfer backends to run in turn, against the same baselines",
    )
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-group-mib", type=int, default=64)
    ap.add_argument("--put-threads", type=int, default=1, help="kv_transfer.put_threads on the prefill side (groups put at once)")
    ap.add_argument(
        "--put-process",
        action="store_true",
        help="kv_transfer.put_process: the prefill side's puts from a putter actor's own process (object store only)",
    )
    ap.add_argument("--copy-threads", type=int, default=4, help="kv_transfer.host_copy_threads on the decode side")
    ap.add_argument("--h2d", choices=("registered", "staged"), default="registered", help="kv_transfer.host_to_device")
    ap.add_argument("--decode-submit", choices=("after_prefill", "with_prefill"), default="after_prefill", help="kv_transfer.decode_submit")
    ap.add_argument(
        "--save",
        choices=("after_forward", "layerwise"),
        default="after_forward",
        help="kv_transfer.save: publish after the prefill's forward pass, or layer group by group during it",
    )
    ap.add_argument(
        "--share-gpu",
        action="store_true",
        help="both engines on one GPU (0.4 of its memory each, started one after the other): a one-GPU machine",
    )
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if len(set(args.backend)) != len(args.backend):
        ap.error(f"--backend: give each backend once, got {' '.join(args.backend)}")
    return args


def path_s(backend: str, r: dict) -> float | None:
    """One transfer's time as the backend lets pdbench see it (docs/metrics.md)."""
    if backend == "nixl-vllm":
        return r.get("kv_wait_s")  # vLLM moves the KV: the decode engine's queued → scheduled
    return r["send_s"] + r["total_s"]  # pdbench's own transport (bytes in the object store, or by NIXL RDT)


def run_backend(backend: str, args: argparse.Namespace) -> list[dict] | str:
    """One backend's transfer records of the measured requests, run one at a time; or why it was refused."""
    import ray

    from actors.disaggregated import DecodeActor, PrefillActor
    from actors.engines.spec import EngineConfig
    from actors.handoffs import refusal
    from actors.handoffs.spec import KVHandoffConfig
    from actors.kv.directory import directory_actor
    from workloads.lengths import Fixed
    from workloads.requests import WorkloadSpec, synthetic_requests

    share = 0.5 if args.share_gpu else 1
    reason = ray.get(ray.remote(refusal).options(num_gpus=share).remote(backend, "vllm"))
    if reason:
        return reason
    cfg = EngineConfig(
        kind="vllm",
        model=args.model,
        dtype="bfloat16",
        max_model_len=args.tokens + 64,
        max_batch_size=8,
        vllm={"gpu_memory_utilization": 0.4 if args.share_gpu else 0.8},
    ).model_dump()
    kv = KVHandoffConfig(
        backend=backend,
        max_group_bytes=args.max_group_mib << 20,
        host_copy_threads=args.copy_threads,
        host_to_device=args.h2d,
        put_threads=args.put_threads,
        put_process=args.put_process,
        decode_submit=args.decode_submit,
        save=args.save,
    ).model_dump()
    dir_name = f"bench-kvdir-{backend}"
    directory = directory_actor(dir_name)  # held: an unreferenced actor is collected
    prefill = PrefillActor.options(num_gpus=share).remote(cfg, kv, dir_name, "bench", "kv")  # type: ignore[attr-defined]  # ray actor class
    decode = DecodeActor.options(num_gpus=share).remote(cfg, kv, prefill, dir_name, "bench", "kv")  # type: ignore[attr-defined]  # ray actor class
    if args.share_gpu:  # vLLM profiles free memory at start: one engine at a time on a shared GPU
        ray.get(prefill.start.remote())
        info = ray.get(decode.start.remote())
    else:
        _, info = ray.get([prefill.start.remote(), decode.start.remote()])
    spec = WorkloadSpec(num_requests=args.requests, warmup_requests=1, input_len=Fixed(value=args.tokens), output_len=Fixed(value=2))
    reqs = [
        {"request_id": r.request_id, "prompt_token_ids": list(r.prompt_token_ids), "max_tokens": r.max_tokens}
        for r in synthetic_requests(spec, info["vocab_size"], seed=0)
    ]

    async def all_sequential():
        for r in reqs:  # one at a time: the transfer alone, not contention, is measured
            async for ref in decode.generate.options(num_returns="streaming").remote(r):
                await ref

    asyncio.run(all_sequential())
    rows = [r for r in ray.get(decode.transfers.remote()) if not r["request_id"].startswith("w")]
    ray.get([decode.shutdown.remote(), prefill.shutdown.remote()])
    for a in (decode, prefill, directory):  # free both GPUs for the next backend
        ray.kill(a)
    return rows


def progress_line(backend: str, rows: list[dict] | str, wall_s: float) -> str:
    """What one backend gave, printed as soon as it is done: a call cut short by its time limit
    still shows the backends that finished (two backends start four engines: minutes)."""
    if isinstance(rows, str):
        return f"[{wall_s:.0f} s] {backend}: refused: {rows}"
    times = [t for r in rows if (t := path_s(backend, r)) is not None]
    median = f", {statistics.median(times) * 1e3:.1f} ms per transfer (median)" if times else ""
    return f"[{wall_s:.0f} s] {backend}: {sum(bool(r['ok']) for r in rows)}/{len(rows)} transfers ok{median}"


def run_all(args: argparse.Namespace) -> dict[str, list[dict] | str]:
    runs: dict[str, list[dict] | str] = {}
    for b in args.backend:
        t0 = time.monotonic()
        runs[b] = run_backend(b, args)
        print(progress_line(b, runs[b], time.monotonic() - t0), flush=True)
    return runs


def summarise(backend: str, rows: list[dict], base_s: float | None, peer_s: float | None) -> dict:
    rows = [r for r in rows if r["ok"]] or rows  # the times of transfers that happened (failures: `failed`)
    times = [t for r in rows if (t := path_s(backend, r)) is not None]
    path = statistics.median(times) if times else None
    nbytes = int(statistics.median(r["bytes"] if r.get("bytes") is not None else r["analytic_bytes"] for r in rows))
    ready = [r["ready_to_injected_s"] for r in rows if r.get("ready_to_injected_s") is not None]
    return {
        "backend": backend,
        "tokens_moved": rows[0]["tokens"],
        "bytes": nbytes,
        "bytes_measured": all(r.get("bytes") is not None for r in rows),
        "analytic_bytes": rows[0]["analytic_bytes"],
        "path_s_median": path,
        "path_gb_s": nbytes / path / 1e9 if path else None,
        "ratio_pinned_over_path": base_s / path if base_s and path else None,
        "ratio_peer_over_path": peer_s / path if path and peer_s else None,
        "stage_medians_s": {s: statistics.median(r[s] for r in rows) for s in STAGES if all(r.get(s) is not None for r in rows)},
        "ready_to_injected_s_median": statistics.median(ready) if ready else None,
        # The second reading: the transfer's latency on the critical path (the two walls of
        # `path` overlap once the receiver follows the sender, and with layer-wise saves the sender's
        # wall starts with the prefill's forward)
        "ratio_pinned_over_ready_to_injected": base_s / statistics.median(ready) if base_s and ready else None,
        "kv_wait_s_median": statistics.median(r["kv_wait_s"] for r in rows) if all(r.get("kv_wait_s") is not None for r in rows) else None,
        "direct_groups_median": statistics.median(r.get("direct_groups") or 0 for r in rows),
        "per_request": [{k: r.get(k) for k in ("send_s", "total_s", "ready_to_injected_s", "kv_wait_s", *STAGES)} for r in rows],
    }


def main() -> int:
    args = parse_args()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import ray
    import torch

    from cluster.ray_env import object_store_options

    ray.init(address="local", namespace="pdbench", include_dashboard=False, log_to_driver=False, **object_store_options())
    runs = run_all(args)
    ray.shutdown()
    measured = {b: rows for b, rows in runs.items() if isinstance(rows, list)}
    # Failed transfers are a result too: printed, kept in the JSON (per_request, failed), exit 1 at the end.
    bad = {b: [r["error"] for r in rows if not r["ok"]] for b, rows in measured.items()}
    if any(bad.values()):
        print("failed transfers:", {b: e for b, e in bad.items() if e})
    any_rows = next((rows for rows in measured.values() if rows), None)
    nbytes = int(any_rows[0]["bytes"] or any_rows[0]["analytic_bytes"]) if any_rows else 0
    base_s = pinned_copy_s(nbytes) if nbytes else None
    peer_s = peer_copy_s(nbytes) if nbytes else None
    res = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "model": args.model,
        "copy_threads": args.copy_threads,
        "put_threads": args.put_threads,
        "put_process": args.put_process,
        "host_to_device": args.h2d,
        "decode_submit": args.decode_submit,
        "save": args.save,
        "shared_gpu": args.share_gpu,
        "baseline_bytes": nbytes,
        "pinned_d2h_h2d_s": base_s,
        "pinned_gb_s": nbytes / base_s / 1e9 if base_s else None,
        "peer_copy_s": peer_s,
        "peer_gb_s": nbytes / peer_s / 1e9 if peer_s else None,
        "backends": {b: summarise(b, rows, base_s, peer_s) if isinstance(rows, list) else {"refused": rows} for b, rows in runs.items()},
        "failed": bad,
    }
    print(json.dumps(res, indent=2))
    if base_s:
        peer = f", peer GPU0 -> GPU1 {peer_s * 1e3:.1f} ms" if peer_s else ", peer copy: one GPU only"
        print(f"baselines for {nbytes / 1e9:.3f} GB: pinned D2H+H2D {base_s * 1e3:.1f} ms{peer}")
    for b, r in res["backends"].items():
        if "refused" in r:
            print(f"{b}: refused: {r['refused']}")
        elif r["path_s_median"]:
            peer_ratio = f", peer/path {r['ratio_peer_over_path']:.3f}" if r["ratio_peer_over_path"] else ""
            print(
                f"{b}: {r['path_s_median'] * 1e3:.1f} ms per transfer ({r['path_gb_s']:.2f} GB/s"
                f"{'' if r['bytes_measured'] else ', analytic bytes'}): pinned/path {r['ratio_pinned_over_path']:.3f}{peer_ratio}"
            )
            if r["ratio_pinned_over_ready_to_injected"]:
                print(
                    f"{b}: KV ready -> injected {r['ready_to_injected_s_median'] * 1e3:.1f} ms (median): "
                    f"pinned/ready->injected {r['ratio_pinned_over_ready_to_injected']:.3f} (goal 0.8)"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
