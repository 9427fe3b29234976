"""Prefill and decode actors on a real local Ray: the oracle, its negative control, and recompute on
every way the KV can fail to arrive."""

import dataclasses
import secrets
import time

import pytest
import ray

from actors.disaggregated import DecodeActor, PrefillActor
from actors.engine_actor import EngineActor
from actors.kv.directory import directory_actor
from actors.kv.transport import GroupMeta, as_bytes, pack, unpack
from actors.router import ReplicaRouter
from analysis.schemas import TRANSFERS

ENGINE = {"kind": "reference", "model": "tiny-qwen3", "cpu_threads": 1, "max_batch_size": 8}
GROUP = 48 * 1024  # the tiny model's KV is 1 KiB per layer and token: 1 to 4 objects per request
KV = {"max_group_bytes": GROUP}
SHORT = {"max_group_bytes": GROUP, "ref_timeout_s": 1.0, "fetch_timeout_s": 1.0}
# Time enough for Ray to report a dead owner to the fetch on a loaded box (1 s was not, once in CI).
PATIENT = {**SHORT, "fetch_timeout_s": 30.0}
HALF = {"num_cpus": 0.5}  # ray_local has 4 CPUs; other tests' actors must still fit beside these


def request(i, n=None, max_tokens=12):
    n = n or 20 + 37 * i
    return {"request_id": f"q{i}", "prompt_token_ids": [(11 * i + 5 * j) % 2048 for j in range(n)], "max_tokens": max_tokens}


async def _stream(actor, method, *args):
    ids, last = [], None
    async for ref in getattr(actor, method).options(num_returns="streaming").remote(*args):
        d = await ref
        ids += d["token_ids"]
        last = d
    return ids, last


def stream(actor, method, *args):
    import asyncio

    return asyncio.run(_stream(actor, method, *args))


@pytest.fixture(scope="module")
def pair(ray_local):
    """A directory, a prefill actor, a decode actor; an aggregated engine for the oracle; and a
    second prefill actor (the victim) with two decode actors bound to it: one of short timeouts,
    one that waits for a fetch long enough to hear that its owner died."""
    run, cell = "test", f"pair{secrets.token_hex(3)}"
    name = f"pdbench:{run}:{cell}:kvdir"
    directory = directory_actor(name)
    prefill = PrefillActor.options(**HALF).remote(ENGINE, KV, name, run, cell)
    decode = DecodeActor.options(**HALF).remote(ENGINE, KV, prefill, name, run, cell)
    victim = PrefillActor.options(num_cpus=0).remote(ENGINE, KV, name, run, cell)
    fragile = DecodeActor.options(num_cpus=0).remote(ENGINE, SHORT, victim, name, run, cell)
    patient = DecodeActor.options(num_cpus=0).remote(ENGINE, PATIENT, victim, name, run, cell)
    engine = EngineActor.options(**HALF).remote(ENGINE)
    actors = [directory, prefill, decode, victim, fragile, patient, engine]
    ray.get([a.start.remote() for a in actors[1:]])
    roles = {"directory": directory, "prefill": prefill, "decode": decode, "victim": victim, "fragile": fragile, "patient": patient}
    yield roles | {"engine": engine}
    for a in actors:
        ray.kill(a)


def aggregated(pair, req):
    return stream(pair["engine"], "generate", req)[0]


def test_disaggregated_tokens_equal_aggregated_and_transfers_are_accounted(pair):
    import asyncio

    reqs = [request(i) for i in range(6)]

    async def both():
        return await asyncio.gather(*(_stream(pair["decode"], "generate", r) for r in reqs))

    got = asyncio.run(both())
    for r, (ids, last) in zip(reqs, got, strict=True):
        assert ids == aggregated(pair, r), r["request_id"]
        s = last["server"]
        assert s["kv_transfer_ok"] is True
        for col in ("server_queue_s", "prefill_s", "transfer_s", "first_decode_s", "server_e2e_s"):
            assert s[col] is not None and s[col] >= 0, col
        assert s["prefill_s"] > 0 and s["transfer_s"] > 0
        assert s["server_e2e_s"] >= s["transfer_s"]
    rows = ray.get(pair["decode"].transfers.remote())
    assert len(rows) == 6 and all(set(r) == set(TRANSFERS.names) - {"warmup"} for r in rows)
    bpt = 2 * 4 * 2 * 64 * 4  # K and V × layers × KV heads × head_dim × float32
    for r, row in zip(sorted(reqs, key=lambda r: r["request_id"]), sorted(rows, key=lambda r: r["request_id"]), strict=True):
        assert row["ok"] and row["error"] is None
        assert row["tokens"] == len(r["prompt_token_ids"])
        assert row["bytes"] == row["analytic_bytes"] == row["tokens"] * bpt
        per_object = min(4, max(1, GROUP // (row["tokens"] * 1024)))  # equal layers, packed greedily
        assert row["groups"] == -(-4 // per_object)
    assert ray.get(pair["decode"].transfers.remote()) == []  # handed over once
    stats = ray.get(pair["directory"].stats.remote())
    assert stats["groups"] == 0 and stats["keys"] == 0


def _intercept(pair, key, corrupt, keep_checksum=False):
    """Man in the middle: take group 0 out of the directory and put it back, optionally with
    layer 0's KV negated, exactly as the receiver would otherwise have found it. A corrupted group
    loses its checksum unless `keep_checksum` (then the receiver's check must catch it)."""
    d = pair["directory"]
    entry = ray.get(d.take.remote(key, 0, 30.0))
    for i, (meta, refs) in enumerate(entry["groups"]):  # group 0 and any already published after it
        layers = [t.clone() for t in unpack(as_bytes(ray.get(refs[0])), meta)]
        if corrupt and i == 0:
            layers[0].neg_()
            if not keep_checksum:
                meta = dataclasses.replace(meta, checksum=None)
        buf, _ = pack(layers)
        assert ray.get(d.register.remote(key, meta.index, meta.groups, meta, [ray.put(buf.numpy())]))


@pytest.mark.parametrize("corrupt", [False, True], ids=["untouched", "one-layer-corrupted"])
def test_negative_control_corrupting_one_layer_changes_the_output(pair, corrupt):
    changed = 0
    for i in range(4):
        req = request(i, max_tokens=16)
        key = f"{req['request_id']}/mitm{secrets.token_hex(3)}"
        reply = ray.get(pair["prefill"].prefill.remote(req, key))
        _intercept(pair, key, corrupt)
        ids, last = stream(pair["decode"], "decode_prefilled", req, key, reply)
        assert last["server"]["kv_transfer_ok"] is True  # the KV did arrive and was used
        changed += ids != aggregated(pair, req)
    ray.get(pair["decode"].transfers.remote())
    assert ray.get(pair["directory"].stats.remote())["keys"] == 0  # groups put back count once
    # Untouched KV through the same detour: identical. One corrupted layer: the output changes.
    assert changed == (4 if corrupt else 0)


def test_checksum_catches_corrupted_kv_and_the_request_is_recomputed(pair):
    req = request(5, max_tokens=12)
    key = f"{req['request_id']}/mitm{secrets.token_hex(3)}"
    reply = ray.get(pair["prefill"].prefill.remote(req, key))
    _intercept(pair, key, corrupt=True, keep_checksum=True)
    ids, last = stream(pair["decode"], "decode_prefilled", req, key, reply)
    assert last["server"]["kv_transfer_ok"] is False  # refused, not used
    assert ids == aggregated(pair, req)  # recomputed on the decode side
    (row,) = ray.get(pair["decode"].transfers.remote())
    assert row["ok"] is False and "checksum mismatch in layers 0.." in row["error"], row["error"]


def _store_bytes_used():
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats.object_store_bytes_used


def test_lost_kv_owner_died_recomputes_and_records_the_reason(pair):
    """The prefill actor that owns the KV objects dies before the decode side fetches them."""
    req = request(9, n=1500, max_tokens=8)  # 1500 tokens: 4 objects of 1.5 MiB, in plasma
    key = f"q9/lost{secrets.token_hex(3)}"
    before = _store_bytes_used()
    reply = ray.get(pair["victim"].prefill.remote(req, key))
    deadline = time.monotonic() + 30
    while ray.get(pair["directory"].stats.remote())["groups"] < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # publishing runs after the reply: wait until all groups are registered
    ray.kill(pair["victim"])
    while _store_bytes_used() > before and time.monotonic() < deadline:
        time.sleep(0.2)  # until Ray has freed the dead owner's objects
    ids, last = stream(pair["patient"], "decode_prefilled", req, key, reply)
    assert last["error"] is None and last["server"]["kv_transfer_ok"] is False
    assert ids == aggregated(pair, req)  # recomputed on the decode side, same greedy tokens
    (row,) = ray.get(pair["patient"].transfers.remote())
    assert row["ok"] is False
    assert "OwnerDiedError" in row["error"] or "ObjectLostError" in row["error"], row["error"]
    assert ray.get(pair["directory"].stats.remote())["groups"] == 0

    # The next request finds the prefill actor itself dead: recompute again, reason recorded.
    ids, last = stream(pair["patient"], "generate", request(10))
    assert ids == aggregated(pair, request(10)) and last["server"]["kv_transfer_ok"] is False
    (row,) = ray.get(pair["patient"].transfers.remote())
    assert row["error"].startswith("prefill: ActorDiedError"), row["error"]


def test_kv_that_never_arrives_times_out_and_recomputes(pair):
    req = request(11, max_tokens=6)
    reply = {"first_token": 0, "num_tokens": len(req["prompt_token_ids"]), "server": {}}
    ids, last = stream(pair["fragile"], "decode_prefilled", req, "never/published", reply)
    assert ids == aggregated(pair, req) and last["server"]["kv_transfer_ok"] is False
    assert last["server"]["transfer_s"] >= 1.0
    (row,) = ray.get(pair["fragile"].transfers.remote())
    assert row["error"] == "KVUnavailable: no reference for layer group 0 within 1 s"


def test_fetch_timeout_recomputes(pair):
    @ray.remote(num_cpus=0)
    def never_ready():
        time.sleep(3600)

    req = request(12, max_tokens=6)
    n = len(req["prompt_token_ids"])
    key = f"q12/stuck{secrets.token_hex(3)}"
    stuck = never_ready.remote()
    meta = GroupMeta(0, 2, 0, ((2, 2, n, 64),) * 2, ("float32",) * 2, (0, 4 * 2 * 2 * n * 64), n, 0, 0.0, 0.0, 0.0, "nowhere")
    ray.get(pair["directory"].register.remote(key, 0, 2, meta, [stuck]))
    reply = {"first_token": 0, "num_tokens": n, "server": {}}
    ids, last = stream(pair["fragile"], "decode_prefilled", req, key, reply)
    ray.cancel(stuck, force=True)
    assert ids == aggregated(pair, req) and last["server"]["kv_transfer_ok"] is False
    (row,) = ray.get(pair["fragile"].transfers.remote())
    assert row["error"] == "KVUnavailable: fetch of layer group 0 timed out after 1 s"
    assert row["fetch_s"] >= 0.9


def test_router_spreads_requests_over_replicas_without_changing_tokens(pair):
    import asyncio

    second = EngineActor.options(**HALF).remote(ENGINE)
    ray.get(second.start.remote())
    router = ReplicaRouter.remote([pair["engine"], second])
    reqs = [request(20 + i) for i in range(6)]
    try:

        async def all_():
            return await asyncio.gather(*(_stream(router, "generate", r) for r in reqs))

        got = asyncio.run(all_())
        counts = ray.get(router.counts.remote())
        assert [ids for ids, _ in got] == [aggregated(pair, r) for r in reqs]
        assert sum(counts) == 6 and min(counts) >= 2  # both replicas served (least in flight, ties alternate)
    finally:
        ray.kill(router)
        ray.kill(second)


def test_a_pair_whose_kv_is_not_interchangeable_is_refused():
    from actors.disaggregated import check_pair

    info = {"architecture": {"hash": "a"}, "dtype": "bfloat16", "extra": {"weight_checksum": "w1"}}
    check_pair(info, dict(info))  # same architecture, dtype and weights: accepted
    with pytest.raises(RuntimeError, match=r"different weights \(w1 vs w2\)"):
        check_pair(info, {**info, "extra": {"weight_checksum": "w2"}})
    with pytest.raises(RuntimeError, match="architecture or dtype"):
        check_pair(info, {**info, "dtype": "float16"})
    with pytest.raises(RuntimeError, match="architecture or dtype"):
        check_pair(info, {**info, "architecture": {"hash": "b"}})


def test_first_decode_is_never_negative():
    """KV sent layer by layer can let the decode engine's first token beat the prefill's reply."""
    from actors.disaggregated import first_decode_s

    assert first_decode_s(t_first=10.05, reply_at=10.0, transfer_s=0.02) == pytest.approx(0.03)
    assert first_decode_s(t_first=10.05, reply_at=10.0, transfer_s=None) == pytest.approx(0.05)
    assert first_decode_s(t_first=9.99, reply_at=10.0, transfer_s=0.0) == 0.0
