"""The vLLM adapter's pure parts (no GPU needed): engine arguments and stats conversion."""

import json
from types import SimpleNamespace

import pytest

from actors.engines.spec import EngineConfig
from actors.engines.vllm_engine import WORKER_EXTENSION, VllmEngine, engine_args, materialise


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
    m = SimpleNamespace(
        queued_ts=100.0, scheduled_ts=100.25, first_token_ts=100.75, last_token_ts=102.0, first_token_latency=0.8, num_generation_tokens=9
    )
    out = SimpleNamespace(metrics=m, num_cached_tokens=0)
    s = VllmEngine._server_stats(out, t_q=5.0, now=7.5)
    assert s["server_queue_s"] == 0.25 and s["prefill_s"] == 0.5 and s["vllm_decode_s"] == 1.25
    assert s["server_e2e_s"] == 2.5 and s["transfer_s"] is None and s["vllm_generation_tokens"] == 9


def test_missing_stats_leave_breakdown_empty():
    s = VllmEngine._server_stats(SimpleNamespace(metrics=None, num_cached_tokens=None), t_q=0.0, now=1.0)
    assert "prefill_s" not in s and s["server_e2e_s"] == 1.0


def test_memory_report_from_vllm_profiler_numbers():
    from actors.engines.vllm_engine import memory_report

    raw = {
        "weights_bytes": 16,
        "kv_cache_bytes": 50,
        "activation_peak_bytes": 4,
        "non_torch_bytes": 2,
        "cudagraph_bytes": 1,
        "device_total_bytes": 80,
        "num_gpu_blocks": 10,
        "block_size": 16,
        "device": "cuda:0",
    }
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
    from actors.handoffs.vllm_object_store import connector_config
    from actors.kv.spec import KVTransferConfig

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
    from actors.handoffs.vllm_object_store import stream_or_recompute

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


class _Remote:
    """`handle.method.remote(...)` of a Ray actor, awaitable, in this process."""

    def __init__(self, fn):
        self.remote = fn


def _with_prefill_actor(prefill_fn, engine, reports):
    import types

    from actors.disaggregated import DecodeActor
    from actors.engines import EngineConfig
    from actors.handoffs.base import PairContext
    from actors.handoffs.spec import KVHandoffConfig
    from actors.handoffs.vllm_object_store import VllmObjectStoreDecode

    side = VllmObjectStoreDecode.__new__(VllmObjectStoreDecode)
    kv = KVHandoffConfig(decode_submit="with_prefill")
    side.ctx = PairContext(EngineConfig(kind="vllm", model="qwen3-0.6b"), kv, "dir", "run", "cell")
    side.engine, side.block_size = engine, 4
    cls = DecodeActor.__ray_metadata__.modified_class
    a = cls.__new__(cls)
    a.side, a.run_id, a.cell_id, a._records, a.backend = side, "run", "cell", [], kv.backend
    a.prefill = types.SimpleNamespace(prefill=_Remote(prefill_fn))
    failed: list[tuple[str, str]] = []

    async def fail(key, reason):  # the waiting load fails, as the connector's would
        failed.append((key, reason))
        engine.fail_load = "error"
        engine.kv.set()

    async def take_report(key, timeout):
        row = reports.pop(0)
        return row() if callable(row) else row

    a.directory = side.directory = types.SimpleNamespace(fail=_Remote(fail), take_report=_Remote(take_report))
    return a, failed


class _WaitingEngine(_FakeEngine):
    """A decode engine whose request waits for its KV (as in WAITING_FOR_REMOTE_KVS) until `kv`."""

    def __init__(self):
        super().__init__(fail_load=None)
        import asyncio

        self.kv = asyncio.Event()
        self.submitted_at: list[float] = []

    async def generate(self, req, kv_transfer_params=None):
        import time

        self.submitted_at.append(time.monotonic())
        if kv_transfer_params:
            await self.kv.wait()
        async for d in super().generate(req, kv_transfer_params):
            yield d


def test_with_prefill_submits_the_decode_request_at_once_and_times_the_tail():
    import asyncio
    import time

    async def main():
        engine = _WaitingEngine()
        t = {}

        async def prefill(request, key):
            await asyncio.sleep(0.05)
            t["reply"] = time.monotonic()
            asyncio.get_running_loop().call_later(0.02, lambda: (t.__setitem__("injected", time.monotonic()), engine.kv.set()))
            return {"first_token": 7, "server": {"server_queue_s": 0.001, "prefill_s": 0.04}}

        reports = [lambda: {"ok": True, "kv_wait_s": 0.07, "injected_mono": t["injected"]}]
        a, failed = _with_prefill_actor(prefill, engine, reports)
        t0 = time.monotonic()
        out = [d async for d in a._generate({"request_id": "r1", "prompt_token_ids": list(range(9)), "max_tokens": 3})]
        reports_row = a._records[0]
        return engine, t, t0, out, failed, reports_row

    engine, t, t0, out, failed, row = asyncio.run(main())
    assert engine.submitted_at[0] - t0 < 0.02 < t["reply"] - t0  # in the engine before the prefill answered
    s = out[-1]["server"]
    assert s["kv_transfer_ok"] is True and failed == []
    assert s["prefill_s"] == 0.04 and s["kv_wait_s"] == 0.07
    assert s["transfer_s"] == pytest.approx(t["injected"] - t["reply"], abs=0.005) and s["transfer_s"] >= 0.01  # KV 20 ms after the reply
    assert 0 <= s["first_decode_s"] < 0.05
    assert [tok for d in out for tok in d["token_ids"]] == [1, 2, 3] and row["ok"]


def test_with_prefill_tells_the_directory_when_the_prefill_fails_and_recomputes():
    import asyncio

    async def main():
        engine = _WaitingEngine()

        async def prefill(request, key):
            raise RuntimeError("prefill actor died")

        reports = [{"ok": False, "error": "sender failed: prefill: RuntimeError: prefill actor died", "total_s": 0.01}]
        a, failed = _with_prefill_actor(prefill, engine, reports)
        out = [d async for d in a._generate({"request_id": "r2", "prompt_token_ids": list(range(9)), "max_tokens": 3})]
        return engine, out, failed

    engine, out, failed = asyncio.run(main())
    assert failed and failed[0][0].startswith("r2/") and "prefill actor died" in failed[0][1]
    assert [c[0] for c in engine.calls] == ["r2", "r2:recompute"]  # the load failed, then a full prefill here
    s = out[-1]["server"]
    assert s["kv_transfer_ok"] is False and [tok for d in out for tok in d["token_ids"]] == [1, 2, 3]


def test_engines_built_alike_share_one_model_folder(tmp_path, monkeypatch):
    """NIXL's handshake compares the model path: two engines of one architecture must name one folder."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    arch = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2}
    a, b = materialise(dict(arch)), materialise(dict(reversed(list(arch.items()))))
    other = materialise({**arch, "num_hidden_layers": 3})
    assert a == b != other and a.startswith(str(tmp_path))
    assert json.loads((tmp_path / a / "config.json").read_text()) == arch
    assert not list((tmp_path / a).glob("*.part"))


def test_scheduler_settings_read_what_vllm_resolved():
    from actors.engines.vllm_engine import scheduler_settings

    old = SimpleNamespace(max_num_batched_tokens=2048, max_num_seqs=64, enable_chunked_prefill=True)  # no async_scheduling field
    assert scheduler_settings(old) == {
        "max_num_batched_tokens": 2048,
        "max_num_seqs": 64,
        "enable_chunked_prefill": True,
        "async_scheduling": None,
    }
    new = SimpleNamespace(max_num_batched_tokens=8192, max_num_seqs=1024, enable_chunked_prefill=True, async_scheduling=True)
    assert scheduler_settings(new)["async_scheduling"] is True and scheduler_settings(new)["max_num_batched_tokens"] == 8192


def test_the_run_manifest_carries_the_scheduler_the_engine_resolved():
    from cluster.config import resolve
    from cluster.run_manifest import _model

    cfg = resolve("e0", {})
    sched = {"max_num_batched_tokens": 2048, "max_num_seqs": 64, "enable_chunked_prefill": True, "async_scheduling": None}
    assert _model(cfg, {"extra": {"scheduler": sched}})["scheduler"] == sched
    assert _model(cfg, {"extra": {}})["scheduler"] is None  # engines other than vLLM have none
