"""KV transfer backends: one registry keyed by `kv_transfer.backend`, each side of each engine kind
implementing the KV-handoff interface, and the names a config can give checked in one line."""

import asyncio
import importlib.util
import inspect
import re

import pytest

from actors.engines import EngineConfig, EngineRequest, TokenDelta
from actors.handoffs import KV_BACKENDS, backend_sides, check_backend, refusal
from actors.handoffs.base import DecodeSide, Handoff, PairContext, Prefilled, PrefillSide
from actors.handoffs.nixl_vllm import NixlVllmDecode, NixlVllmPrefill, connector_config, side_channel
from actors.handoffs.spec import DEFAULT_BACKEND, KVHandoffConfig
from actors.kv.spec import KVTransferConfig
from cluster.config import ConfigError, resolve


def _methods(protocol: type) -> set[str]:
    return {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_every_backend_side_implements_the_handoff_interface():
    assert DEFAULT_BACKEND in KV_BACKENDS
    for name in KV_BACKENDS:
        for kind in KV_BACKENDS.get(name).engines:
            sides = backend_sides(name, kind)
            for cls, protocol in ((sides.prefill, PrefillSide), (sides.decode, DecodeSide)):
                missing = {m for m in _methods(protocol) if not inspect.isfunction(getattr(cls, m, None))}
                assert not missing, f"{name}/{kind}: {cls.__name__} lacks {missing}"
                for m in _methods(protocol):  # async where the interface is, plain where it is not
                    want = inspect.iscoroutinefunction(getattr(protocol, m))
                    assert inspect.iscoroutinefunction(getattr(cls, m)) == want, f"{cls.__name__}.{m}"
            assert isinstance(sides.decode.own_stats_prefix, str)


def test_the_object_store_moves_reference_and_vllm_kv_and_nixl_only_vllm():
    assert KV_BACKENDS.names() == ["nixl-vllm", "ray-object-store", "ray-rdt-nixl"]
    check_backend("ray-object-store", "reference")
    check_backend("ray-object-store", "vllm")
    check_backend("ray-rdt-nixl", "reference")
    check_backend("ray-rdt-nixl", "vllm")
    check_backend("nixl-vllm", "vllm")
    with pytest.raises(
        ValueError, match=re.escape("ray-object-store KV backend moves the KV of reference or vllm engines, not 'simulated'")
    ):
        check_backend("ray-object-store", "simulated")
    with pytest.raises(ValueError, match=re.escape("engine.kind: the nixl-vllm KV backend moves the KV of vllm engines, not 'reference'")):
        check_backend("nixl-vllm", "reference")


def test_an_unknown_backend_is_one_line_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError) as e:
        resolve("e3", {"kv_transfer": {"backend": "carrier-pigeon"}})
    assert "kv_transfer.backend" in str(e.value) and "choose one of: nixl-vllm, ray-object-store, ray-rdt-nixl" in str(e.value), str(
        e.value
    )
    assert resolve("e3", {}).kv_transfer.backend == DEFAULT_BACKEND


def test_the_transport_settings_leave_the_backend_name_out():
    """The vLLM connector validates its settings as KVTransferConfig (extra fields forbidden)."""
    kv = KVHandoffConfig(put_threads=3)
    assert kv.transport() == KVTransferConfig(put_threads=3)


def test_only_the_rdt_backend_moves_its_groups_by_tensor_transport():
    assert KVHandoffConfig().tensor_transport() is None
    assert KVHandoffConfig(backend="ray-rdt-nixl").tensor_transport() == "nixl"
    assert KVHandoffConfig(backend="nixl-vllm").tensor_transport() is None


def test_the_vllm_connector_is_told_the_tensor_transport(ray_local):
    from actors.handoffs.vllm_object_store import connector_config

    engine = EngineConfig(kind="vllm", model="qwen3-8b")
    rdt = connector_config(engine, KVHandoffConfig(backend="ray-rdt-nixl"), "dir", "run", "cell")["kv_connector_extra_config"]
    store = connector_config(engine, KVHandoffConfig(), "dir", "run", "cell")["kv_connector_extra_config"]
    assert rdt["tensor_transport"] == "nixl" and store["tensor_transport"] is None
    assert "backend" not in rdt["kv_transfer"]  # the connector validates its settings without the backend name


# --- refusals: a backend says in one line why it cannot run here -----------------------------------
def test_refusal_names_the_engine_kind_first_then_what_the_backend_lacks():
    assert refusal("ray-object-store", "reference") is None
    assert refusal("nixl-vllm", "reference") == "engine.kind: the nixl-vllm KV backend moves the KV of vllm engines, not 'reference'"


def test_ray_rdt_nixl_runs_wherever_ray_can_start_a_nixl_agent(ray_local):
    """nixl is a test dependency: on this CPU box Ray's NIXL transport starts over UCX. Asked in a
    one-call task, as the cell asks it: a NIXL agent keeps a core busy while its process lives."""
    import ray

    assert ray.get(ray.remote(num_cpus=0, max_calls=1)(refusal).remote("ray-rdt-nixl", "reference")) is None
    assert (
        refusal("ray-rdt-nixl", "simulated")
        == "engine.kind: the ray-rdt-nixl KV backend moves the KV of reference or vllm engines, not 'simulated'"
    )


def test_ray_rdt_nixl_refuses_in_one_line_without_nixl(monkeypatch):
    from actors.handoffs import rdt

    monkeypatch.setattr(rdt.importlib.util, "find_spec", lambda name: None)
    assert rdt.refusal() == "ray-rdt-nixl: nixl is not installed on this node (pip install nixl; the GPU kit carries it)"


def test_nixl_vllm_refuses_on_this_cpu_box_with_its_reason():
    """This box has neither nixl nor vLLM nor CUDA: the backend's own check says which is missing first."""
    reason = refusal("nixl-vllm", "vllm")
    assert reason is not None and reason.startswith("nixl-vllm: ") and "\n" not in reason, reason
    if importlib.util.find_spec("nixl") is None:
        assert reason == "nixl-vllm: nixl (the nixl and nixl-cu13 wheels of the GPU kit) is not installed on this node"


@pytest.mark.gpu
def test_nixl_vllm_is_available_on_a_gpu_node_with_the_kit():
    assert refusal("nixl-vllm", "vllm") is None


# --- nixl-vllm: vLLM's handshake, forwarded by pdbench (a stand-in engine plays vLLM's part) -------
REMOTE = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[3, 4]],
    "remote_engine_id": "e/p",
    "remote_request_id": "r0:prefill-1234abcd",
    "remote_host": "10.0.0.1",
    "remote_port": 5601,
    "tp_size": 1,
}


class _FakeVllm:
    """Answers like VllmEngine: the prefill's last delta carries the output's kv_transfer_params
    in its server fields; the decode takes the KV it is told about (num_cached_tokens) unless `fail`."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    async def generate(self, req, kv_transfer_params=None):
        self.calls.append((req, kv_transfer_params))
        if kv_transfer_params and kv_transfer_params.get("do_remote_decode"):
            yield TokenDelta([7], [0.01], finished=True, server={"server_queue_s": 0.001, "prefill_s": 0.02, "kv_transfer_params": REMOTE})
            return
        if kv_transfer_params and self.fail:
            yield TokenDelta([], [], finished=True, error=self.fail, finish_reason="error")
            return
        cached = len(req.prompt_token_ids) - 1 if kv_transfer_params else 0
        yield TokenDelta([7, 8], [0.1, 0.2], finished=True, server={"server_queue_s": 0.05, "vllm_num_cached_tokens": cached})


def _ctx():
    return PairContext(EngineConfig(kind="vllm"), KVHandoffConfig(backend="nixl-vllm"), "dir", "run", "cell")


def _sides(engine):
    prefill, decode = object.__new__(NixlVllmPrefill), object.__new__(NixlVllmDecode)
    prefill.ctx = decode.ctx = _ctx()
    prefill.engine, decode.engine, decode.kv_bytes_per_token = engine, engine, 100
    return prefill, decode


async def _handoff(prefill, decode, req):
    reply = await prefill.prefill(req, "k")
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(Prefilled(reply, None, 0.0))
    h = Handoff(req, "k", "run", "cell", fut)
    deltas = [d async for d in decode.decode(h)]
    return reply, h, deltas


def test_nixl_prefill_asks_for_remote_decode_and_decode_forwards_vllms_params():
    engine = _FakeVllm()
    prefill, decode = _sides(engine)
    req = EngineRequest("r0", list(range(40)), 2)
    reply, h, _ = asyncio.run(_handoff(prefill, decode, req))
    (p_req, p_params), (d_req, d_params) = engine.calls
    assert p_req.max_tokens == 1 and p_params["do_remote_decode"] is True and p_params["remote_block_ids"] is None
    assert reply["first_token"] == 7 and reply["published"] is True
    assert d_req is req and d_params == REMOTE  # vLLM's own answer, unchanged
    o = h.outcome
    assert o.ok and o.transfer_s == 0.05 and o.retry_reason is None
    assert o.record["tokens"] == 39 and o.record["analytic_bytes"] == 3900 and o.record["bytes"] is None
    assert o.record["status"] == "ok" and o.record["put_s"] is None and o.record["fetch_s"] is None


def test_a_failed_nixl_read_is_recomputed_and_recorded_not_hidden():
    engine = _FakeVllm(fail="vLLM finished the request with reason 'error' after 0 of 2 tokens")
    prefill, decode = _sides(engine)
    _, h, deltas = asyncio.run(_handoff(prefill, decode, EngineRequest("r0", list(range(40)), 2)))
    assert [d.token_ids for d in deltas] == [[7, 8]] and engine.calls[-1][1] is None  # the recompute
    assert not h.outcome.ok and h.outcome.retry_reason.startswith("vLLM finished the request")
    assert h.outcome.record["status"] == "failed" and h.outcome.record["error"] == h.outcome.retry_reason


def test_nixl_connector_config_and_side_channel():
    cfg = connector_config(_ctx(), "prefill")
    assert cfg["kv_connector"] == "NixlConnector" and cfg["kv_role"] == "kv_producer" and cfg["engine_id"] == "run/cell/prefill"
    assert connector_config(_ctx(), "decode")["kv_role"] == "kv_consumer"
    env = side_channel("127.0.0.1")
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1" and 0 < int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) < 65536
