"""The vLLM adapter's pure parts (no GPU needed): engine arguments and stats conversion."""

from types import SimpleNamespace

from actors.engines.spec import EngineConfig
from actors.engines.vllm_engine import WORKER_EXTENSION, VllmEngine, engine_args


def test_dummy_weights_for_architecture_configs():
    cfg = EngineConfig(kind="vllm", model="qwen3-8b", dtype="bfloat16", max_model_len=4096, max_batch_size=64, weight_seed=3)
    a = engine_args(cfg, "/tmp/m", dummy=True)
    assert a["load_format"] == "dummy" and a["skip_tokenizer_init"] is True
    assert a["seed"] == 3 and a["max_num_seqs"] == 64 and a["max_model_len"] == 4096 and a["dtype"] == "bfloat16"
    assert a["enable_prefix_caching"] is False and a["disable_log_stats"] is False
    assert a["worker_extension_cls"] == WORKER_EXTENSION


def test_real_weights_load_normally_and_overrides_win():
    cfg = EngineConfig(kind="vllm", model="Qwen/Qwen3-8B", vllm={"gpu_memory_utilization": 0.5, "enable_prefix_caching": True})
    a = engine_args(cfg, "Qwen/Qwen3-8B", dummy=False, kv_transfer_config={"kv_connector": "X"})
    assert "load_format" not in a and "skip_tokenizer_init" not in a
    assert a["gpu_memory_utilization"] == 0.5 and a["enable_prefix_caching"] is True
    assert a["kv_transfer_config"] == {"kv_connector": "X"}


def test_server_stats_are_differences_of_the_engine_clock():
    m = SimpleNamespace(queued_ts=100.0, scheduled_ts=100.25, first_token_ts=100.75, last_token_ts=102.0,
                        first_token_latency=0.8, num_generation_tokens=9)
    out = SimpleNamespace(metrics=m, num_cached_tokens=0)
    s = VllmEngine._server_stats(out, t_q=5.0, now=7.5)
    assert s["server_queue_s"] == 0.25 and s["prefill_s"] == 0.5 and s["vllm_decode_s"] == 1.25
    assert s["server_e2e_s"] == 2.5 and s["transfer_s"] is None and s["vllm_generation_tokens"] == 9


def test_missing_stats_leave_breakdown_empty():
    s = VllmEngine._server_stats(SimpleNamespace(metrics=None, num_cached_tokens=None), t_q=0.0, now=1.0)
    assert "prefill_s" not in s and s["server_e2e_s"] == 1.0


def test_memory_report_from_vllm_profiler_numbers():
    from actors.engines.vllm_engine import memory_report

    raw = {"weights_bytes": 16, "kv_cache_bytes": 50, "activation_peak_bytes": 4, "non_torch_bytes": 2,
           "cudagraph_bytes": 1, "device_total_bytes": 80, "num_gpu_blocks": 10, "block_size": 16, "device": "cuda:0"}
    m = memory_report(raw)
    assert m.measured and m.other_bytes == 3 and m.total_bytes == 73 and m.kv_cache_tokens == 160
    assert m.device == "cuda:0" and m.detail == raw


def test_a_request_vllm_ends_early_is_a_failure():
    assert VllmEngine.finish_error("length", 64, 64) is None
    assert "reason 'error' after 0 of 64" in VllmEngine.finish_error("error", 0, 64)
    assert "reason 'abort'" in VllmEngine.finish_error("abort", 3, 64)
    assert "after 10 of 64" in VllmEngine.finish_error("length", 10, 64)  # never short without an error
    assert "reason 'stop'" in VllmEngine.finish_error("stop", 64, 64)  # ignore_eos: a stop is not ours


def test_connector_leaves_a_failed_load_to_the_decode_actor(ray_local):
    from actors.kv.spec import KVTransferConfig
    from actors.vllm_disaggregated import connector_config

    cfg = EngineConfig(kind="vllm", model="qwen3-0.6b")
    c = connector_config(cfg, KVTransferConfig(), "dir", "run", "cell")
    assert c["kv_load_failure_policy"] == "fail"  # vLLM 0.26's recompute is wrong (vllm#49250)
    assert c["kv_connector_module_path"] == "actors.kv.vllm_connector"


class _FakeEngine:
    """Ends the transfer attempt as vLLM does when its KV load fails (policy "fail"): finished,
    no tokens, an error; a request without a transfer streams its tokens."""

    def __init__(self, fail_load: str | None):
        self.fail_load = fail_load
        self.calls: list[tuple[str, dict | None]] = []

    async def generate(self, req, kv_transfer_params=None):
        from actors.engines.base import TokenDelta

        self.calls.append((req.request_id, kv_transfer_params))
        if kv_transfer_params and self.fail_load:
            reason = self.fail_load
            yield TokenDelta(finished=True, finish_reason=reason, error=VllmEngine.finish_error(reason, 0, req.max_tokens))
            return
        yield TokenDelta(token_ids=[1, 2], token_s=[0.1, 0.1])
        yield TokenDelta(token_ids=[3], token_s=[0.2], finished=True)


async def _collect(engine, params):
    from actors.engines import EngineRequest
    from actors.vllm_disaggregated import stream_or_recompute

    retried: list[str] = []
    out = [d async for d in stream_or_recompute(engine, EngineRequest("r1", [5, 6, 7], 3), params, retried)]
    return out, retried


def test_a_failed_load_runs_the_request_again_without_the_transfer():
    import asyncio

    e = _FakeEngine(fail_load="error")
    out, retried = asyncio.run(_collect(e, {"pdbench_role": "consumer", "key": "r1/k"}))
    assert [t for d in out for t in d.token_ids] == [1, 2, 3] and out[-1].error is None
    assert e.calls == [("r1", {"pdbench_role": "consumer", "key": "r1/k"}), ("r1:recompute", None)]
    assert "reason 'error' after 0 of 3" in retried[0]


def test_a_good_load_or_no_transfer_runs_once():
    import asyncio

    for params in ({"pdbench_role": "consumer", "key": "r1/k"}, None):
        e = _FakeEngine(fail_load=None)
        out, retried = asyncio.run(_collect(e, params))
        assert [t for d in out for t in d.token_ids] == [1, 2, 3] and retried == [] and len(e.calls) == 1
    e = _FakeEngine(fail_load="error")
    out, retried = asyncio.run(_collect(e, None))  # no transfer asked: nothing to fail
    assert len(e.calls) == 1 and retried == []


def test_an_aborted_request_is_not_retried():
    import asyncio

    e = _FakeEngine(fail_load="abort")
    out, retried = asyncio.run(_collect(e, {"pdbench_role": "consumer", "key": "r1/k"}))
    assert len(e.calls) == 1 and retried == [] and "reason 'abort'" in out[-1].error
