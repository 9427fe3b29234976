"""Reference engine: KV exported by one engine continues on another, token for token
(tests/test_reference_engine.py holds the batched == unbatched oracle)."""

import asyncio

import pytest
import torch

from actors.engines import EngineConfig, EngineRequest, build_engine

CFG = EngineConfig(kind="reference", model="tiny-qwen3", max_batch_size=4, cpu_threads=1)
PROMPTS = [[(7 * i + 3 * j) % 2048 for j in range(n)] for i, n in enumerate((12, 40, 5, 77, 23))]


def _req(i, prompt, max_tokens=10):
    return EngineRequest(request_id=f"q{i}", prompt_token_ids=prompt, max_tokens=max_tokens)


async def _collect(stream):
    ids, last = [], None
    async for d in stream:
        ids += d.token_ids
        last = d
    assert last is not None and last.finished and last.error is None, last
    return ids, last.server


async def _with_engines(n, body, cfg=CFG):
    engines = [build_engine(cfg) for _ in range(n)]
    for e in engines:
        await e.start()
    try:
        return await body(*engines)
    finally:
        for e in engines:
            await e.shutdown()


def _inject(engine, prefilled, max_tokens, corrupt_layer=None):
    state, dsts = engine.import_kv(prefilled.num_tokens, prefilled.num_tokens + max_tokens)
    for li, (src, dst) in enumerate(zip(prefilled.layers, dsts, strict=True)):
        dst.copy_(src)
        if li == corrupt_layer:
            dst.mul_(-1.0)
    return state


def test_exported_kv_continues_on_another_engine_exactly():
    async def body(prefill, decode):
        out = []
        for i, p in enumerate(PROMPTS):
            ref, _ = await _collect(prefill.generate(_req(i, p)))
            pre = await prefill.prefill_export(_req(i, p))
            assert pre.num_tokens == len(p)
            assert [tuple(t.shape) for t in pre.layers] == [(2, 2, len(p), 64)] * 4  # [K/V, kv_heads, n, head_dim]
            assert pre.server["prefill_s"] > 0 and pre.server["server_queue_s"] >= 0
            state = _inject(decode, pre, 10)
            got, _server = await _collect(decode.generate_injected(_req(i, p), pre.first_token, state))
            broken = await _collect(decode.generate_injected(_req(i, p), pre.first_token, _inject(decode, pre, 10, corrupt_layer=1)))
            out.append((ref, got, broken[0], pre.first_token))
        return out

    results = asyncio.run(_with_engines(2, body))
    for ref, got, _, first in results:
        assert got == ref
        assert got[0] == first
    # Negative control: the injected KV is what decoding reads; flipping one layer changes the output.
    assert any(broken != ref for ref, _, broken, _ in results)


def test_prefill_export_finishes_after_one_token_and_refuses_too_long_prompts():
    async def body(engine):
        pre = await engine.prefill_export(_req(0, PROMPTS[0], max_tokens=50))
        with pytest.raises(RuntimeError, match=r"exceeds engine.max_model_len"):
            await engine.prefill_export(_req(1, [1] * 60, max_tokens=10))
        with pytest.raises(ValueError, match=r"exceeds engine.max_model_len"):
            engine.import_kv(60, 70)
        return pre

    pre = asyncio.run(_with_engines(1, body, cfg=CFG.model_copy(update={"max_model_len": 64})))
    assert isinstance(pre.first_token, int)
    assert all(t.dtype == torch.float32 for t in pre.layers)
