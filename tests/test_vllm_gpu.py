"""vLLM on real GPUs (`pytest -m gpu` on a GPU node with vllm installed; two GPUs for the pair).

The disaggregated pair must give the aggregated engine's greedy tokens and move exactly the
prompt's whole blocks, and a KV load that fails inside the decode engine must be recomputed there
(the request completes, its transfer record says why). A GPU negative control that decodes with
another random prompt's KV was tried on H200 and left the greedy tokens unchanged: vLLM's dummy
weights, uniform in ±1e-3, make greedy output nearly context-free. The negative control runs on
the reference engine instead (tests/test_disaggregated.py).
"""

import importlib.util

import pytest

pytestmark = pytest.mark.gpu

MODEL = "qwen3-0.6b"


def _gpus() -> int:
    if importlib.util.find_spec("vllm") is None:
        return 0
    import torch

    return torch.cuda.device_count()


@pytest.fixture(scope="module")
def gpu_ray():
    if _gpus() < 2:
        pytest.fail("this test needs vllm and two CUDA GPUs (run it with -m gpu on such a node)")
    import ray

    ray.init(address="local", namespace="pdbench", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _engine_cfg() -> dict:
    from actors.engines.spec import EngineConfig

    return EngineConfig(
        kind="vllm",
        model=MODEL,
        dtype="bfloat16",
        max_model_len=2048,
        max_batch_size=16,
        vllm={"gpu_memory_utilization": 0.5, "enforce_eager": True},
    ).model_dump()


def _requests(vocab_size: int) -> list[dict]:
    """Four 300-token prompts, 24 tokens out each, as the actors take them."""
    from workloads.lengths import Fixed
    from workloads.requests import WorkloadSpec, synthetic_requests

    spec = WorkloadSpec(num_requests=4, warmup_requests=0, input_len=Fixed(value=300), output_len=Fixed(value=24))
    return [
        {"request_id": r.request_id, "prompt_token_ids": list(r.prompt_token_ids), "max_tokens": r.max_tokens}
        for r in synthetic_requests(spec, vocab_size, seed=0)
    ]


async def _tokens(stream):
    out, last = [], None
    async for ref in stream:
        d = await ref
        out.extend(d["token_ids"])
        last = d
    return out, last


def _published(directory, key, timeout_s=30.0):
    """Wait until every layer group of `key` is registered (the connector publishes off the step)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = ray.get(directory.status.remote(key))
        assert st["failed"] is None, st
        if st["expected"] and st["registered"] >= st["expected"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{key} was never published")


def _flip(directory, key):
    """Put `key`'s groups back with one value of the first layer changed but the sender's
    checksum kept: only the receiver's checksum can see it (the oracle cannot, on dummy weights)."""
    import ray
    import torch

    from actors.kv.transport import as_bytes, pack, unpack

    entry = ray.get(directory.take.remote(key, 0, 30.0))
    for meta, refs in entry["groups"]:
        layers = [t.clone() for t in unpack(as_bytes(ray.get(refs[0])), meta)]
        if meta.index == 0:
            layers[0].view(torch.uint8)[0] ^= 0x40
        buf, _ = pack(layers)
        tt = meta.tensor_transport  # the group travels back the way it came: NIXL from a GPU, or plasma bytes
        ref = ray.put(buf.cuda(), _tensor_transport=tt) if tt else ray.put(buf.numpy())
        assert ray.get(directory.register.remote(key, meta.index, meta.groups, meta, [ref]))


def _tamper(directory, key):
    """Put `key`'s groups back with the last layer claiming one block: the decode engine's load
    fails there, after every other layer's copy was queued (they must settle before the blocks are
    reused) and after its scheduler counted those tokens as external."""
    import dataclasses

    import ray

    entry = ray.get(directory.take.remote(key, 0, 30.0))
    for meta, refs in entry["groups"]:
        if meta.index == meta.groups - 1:
            last = meta.shapes[-1]
            meta = dataclasses.replace(meta, shapes=(*meta.shapes[:-1], (1, *last[1:])))
        assert ray.get(directory.register.remote(key, meta.index, meta.groups, meta, refs))


@pytest.mark.parametrize(
    "save,backend", [("after_forward", "ray-object-store"), ("layerwise", "ray-object-store"), ("after_forward", "ray-rdt-nixl")]
)
def test_disaggregated_pair_matches_aggregated_and_uses_the_kv(gpu_ray, save, backend):
    """pdbench's own connector, its KV as object-store bytes or by Ray Direct Transport (NIXL, GPU to GPU)."""
    import asyncio

    import ray

    from actors.disaggregated import DecodeActor, PrefillActor
    from actors.engine_actor import EngineActor
    from actors.handoffs.spec import KVHandoffConfig
    from actors.kv.directory import directory_actor

    cfg = _engine_cfg()
    kv = KVHandoffConfig(save=save, backend=backend).model_dump()
    directory = directory_actor(f"gpu-test-kvdir-{save}-{backend}")
    prefill = PrefillActor.options(num_gpus=1).remote(cfg, kv, f"gpu-test-kvdir-{save}-{backend}", "t", "c")
    decode = DecodeActor.options(num_gpus=1).remote(cfg, kv, prefill, f"gpu-test-kvdir-{save}-{backend}", "t", "c")
    p_info, d_info = ray.get([prefill.start.remote(), decode.start.remote()])
    assert p_info["extra"]["weight_checksum"] == d_info["extra"]["weight_checksum"]
    reqs = _requests(d_info["vocab_size"])

    async def disagg():
        return [await _tokens(decode.generate.options(num_returns="streaming").remote(r)) for r in reqs]

    got = asyncio.run(disagg())
    rows = ray.get(decode.transfers.remote())

    bad = dict(reqs[0], request_id="bad0")
    key = "bad0/tampered"
    reply = ray.get(prefill.prefill.remote(bad, key))
    _published(directory, key)
    _tamper(directory, key)
    recomputed, last = asyncio.run(_tokens(decode.decode_prefilled.options(num_returns="streaming").remote(bad, key, reply)))
    bad_rows = ray.get(decode.transfers.remote())

    # One flipped bit in the KV, sender's checksum kept: the load fails on the checksum.
    flip = dict(reqs[1], request_id="flip1")
    reply = ray.get(prefill.prefill.remote(flip, "flip1/k"))
    _published(directory, "flip1/k")
    _flip(directory, "flip1/k")
    flipped, flip_last = asyncio.run(_tokens(decode.decode_prefilled.options(num_returns="streaming").remote(flip, "flip1/k", reply)))
    flip_rows = ray.get(decode.transfers.remote())

    # Abort mid-load: a consumer whose KV never comes is cancelled while it waits; the decode
    # engine frees its blocks and serves the next request.
    import time

    lost = dict(reqs[2], request_id="lost2")
    gen = decode.decode_prefilled.options(num_returns="streaming").remote(lost, "lost2/never", {"published": None, "server": {}})
    time.sleep(3.0)
    ray.cancel(gen)
    aborted_row = ray.get(directory.take_report.remote("lost2/never", 20.0))
    after_abort = asyncio.run(disagg())
    ray.get([decode.shutdown.remote(), prefill.shutdown.remote()])
    ray.kill(decode)
    ray.kill(prefill)

    agg = EngineActor.options(num_gpus=1).remote(cfg)
    ray.get(agg.start.remote())

    async def aggregated():
        return [(await _tokens(agg.generate.options(num_returns="streaming").remote(r)))[0] for r in reqs]

    want = asyncio.run(aggregated())
    ray.get(agg.shutdown.remote())
    ray.kill(agg)

    assert [t for t, _ in got] == want
    # The failed load: vLLM ended the attempt and the decode actor ran the request again without a
    # transfer; it completed with every token, the aggregated ones, and its record keeps the reason.
    # (vLLM 0.26's own kv_load_failure_policy "recompute" failed this check on 2x H200: its output
    # came shifted by one token, vllm-project/vllm#49250.)
    assert last["error"] is None and len(recomputed) == 24, last
    assert last["server"]["kv_transfer_ok"] is False and "reason 'error'" in last["server"]["decode_retry_reason"]
    assert [r["ok"] for r in bad_rows] == [False] and "received" in bad_rows[0]["error"], bad_rows
    assert recomputed == want[0]
    assert flipped == want[1] and flip_last["server"]["kv_transfer_ok"] is False
    assert [r["ok"] for r in flip_rows] == [False] and "checksum mismatch" in flip_rows[0]["error"], flip_rows
    assert aborted_row is not None and aborted_row["status"] == "cancelled", aborted_row
    assert [t for t, _ in after_abort] == want  # the engine lived on, with its blocks back
    assert all(r["ok"] for r in rows), rows
    assert all(r["kv_wait_s"] is not None and r["ready_to_injected_s"] is not None for r in rows), rows
    block = d_info["extra"]["vllm_memory"]["block_size"]
    for r in rows:
        assert r["tokens"] == (300 - 1) // block * block and r["bytes"] == r["analytic_bytes"]
    assert all(d["server"]["kv_transfer_ok"] and d["server"]["transfer_s"] > 0 for _, d in got)
    ray.kill(directory)


def test_nixl_vllm_pair_matches_aggregated_and_moves_the_kv(gpu_ray):
    """vLLM's own NixlConnector between two pdbench engine actors: every request's prompt KV is
    read over NIXL (the decode engine computes none of the prompt) and the greedy tokens are
    the aggregated engine's. If a read fails, vLLM's log says why: `NIXL transfer failure` in the
    Ray session's worker logs."""
    import asyncio

    import ray

    from actors.disaggregated import DecodeActor, PrefillActor
    from actors.engine_actor import EngineActor
    from actors.handoffs.nixl_vllm import refusal
    from actors.handoffs.spec import KVHandoffConfig
    from actors.kv.directory import directory_actor

    assert ray.get(ray.remote(num_gpus=1)(refusal).remote()) is None
    cfg = _engine_cfg()
    kv = KVHandoffConfig(backend="nixl-vllm").model_dump()
    directory = directory_actor("gpu-test-kvdir-nixl")
    prefill = PrefillActor.options(num_gpus=1).remote(cfg, kv, "gpu-test-kvdir-nixl", "t", "nixl")
    decode = DecodeActor.options(num_gpus=1).remote(cfg, kv, prefill, "gpu-test-kvdir-nixl", "t", "nixl")
    ray.get([prefill.start.remote(), decode.start.remote()])
    reqs = _requests(151936)  # qwen3-0.6b's vocabulary

    async def run(actor):
        return [await _tokens(actor.generate.options(num_returns="streaming").remote(r)) for r in reqs]

    got = asyncio.run(run(decode))
    rows = ray.get(decode.transfers.remote())
    ray.get([decode.shutdown.remote(), prefill.shutdown.remote()])
    for a in (decode, prefill, directory):
        ray.kill(a)
    agg = EngineActor.options(num_gpus=1).remote(cfg)
    ray.get(agg.start.remote())
    want = [t for t, _ in asyncio.run(run(agg))]
    ray.get(agg.shutdown.remote())
    ray.kill(agg)

    assert all(r["ok"] for r in rows), rows
    # vLLM counts the whole prompt as not computed (num_cached_tokens = 300 on 2x H200, 0.26.0):
    # NIXL reads the last, partial block too.
    assert [(r["tokens"], r["kv_wait_s"] is not None) for r in rows] == [(300, True)] * len(rows), rows
    assert all(d["server"]["kv_transfer_ok"] for _, d in got), [d["server"] for _, d in got]
    assert [t for t, _ in got] == want
