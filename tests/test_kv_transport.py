"""The KV transport on a real local Ray: bytes arrive unchanged, every failure is a recorded reason,
and nothing stays behind in the directory or the object store."""

import asyncio
import dataclasses
import errno
import os
import secrets
import sys
import threading
import time
import typing

import pyarrow as pa
import pydantic
import pytest
import ray
import torch

from actors.kv import accounting, putter
from actors.kv.accounting import TransferRecord
from actors.kv.directory import directory_actor, find_directory
from actors.kv.spec import KVTransferConfig
from actors.kv.transport import CopyInto, GroupMeta, layer_groups, publish, receive
from analysis.kv import kv_bytes_per_token
from analysis.schemas import TRANSFERS

# Ray workers cannot import test modules: ship this module's actors and tasks by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

IDENT = {"run_id": "t", "cell_id": "transport", "request_id": "r0"}
LAYER_BYTES = 2 * 2 * 33 * 16 * 4  # kv_layers()' default: [2, 2 heads, 33 tokens, 16] float32
FAST = KVTransferConfig(max_group_bytes=2 * LAYER_BYTES, ref_timeout_s=1.0, fetch_timeout_s=1.0)


@pytest.fixture(scope="module")
def directory(ray_local):
    name = f"pdbench:test:{secrets.token_hex(3)}:kvdir"
    d = directory_actor(name)
    ray.get(d.stats.remote())
    yield d
    ray.kill(d)


def kv_layers(layers=5, heads=2, tokens=33, head_dim=16, dtype=torch.float32, seed=0):
    """One request's KV as the reference engine exports it: strided views [2, heads, n, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(layers, 2, heads, tokens + 7, head_dim, generator=g).to(dtype)  # capacity > n
    return [full[i, :, :, :tokens] for i in range(layers)]


def empty_like(layers):
    return [torch.empty(t.shape, dtype=t.dtype) for t in layers]


def key():
    return f"req/{secrets.token_hex(4)}"


# 5 layers, objects of at most two float32 layers: 2 + 2 + 1 float32 layers, or 4 + 1 half-size ones.
@pytest.mark.parametrize("dtype,groups", [(torch.float32, 3), (torch.bfloat16, 2), (torch.float16, 2)])
def test_roundtrip_is_bit_exact_and_fully_accounted(directory, dtype, groups):
    src = kv_layers(dtype=dtype)
    k = key()
    sent = publish(directory, k, src, tokens=33, cfg=FAST)
    dst = empty_like(src)
    bpt = kv_bytes_per_token(5, 2, 16, str(dtype).removeprefix("torch."))
    rec = receive(directory, k, CopyInto(dst), FAST, **IDENT, kv_bytes_per_token=bpt)
    assert rec.ok, rec.error
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert sent.groups == rec.groups == groups
    assert rec.bytes == sent.bytes == rec.analytic_bytes == 33 * bpt
    assert rec.tokens == 33
    for stage in ("extract_s", "put_s", "wait_ref_s", "fetch_s", "get_s", "inject_s"):
        assert getattr(rec, stage) >= 0, stage
    assert rec.extract_s == pytest.approx(sent.extract_s) and rec.put_s == pytest.approx(sent.put_s)
    assert rec.send_s == pytest.approx(sent.send_s) and sent.send_s >= sent.extract_s + sent.put_s
    assert rec.stall_s == pytest.approx(rec.wait_ref_s + rec.fetch_s)
    assert rec.total_s >= rec.stall_s + rec.get_s
    assert rec.src_node == rec.dst_node == ray.get_runtime_context().get_node_id()
    assert ray.get(directory.stats.remote())["groups"] == 0


@pytest.mark.parametrize("put_process", [False, True], ids=["in_process", "putter"])
@pytest.mark.parametrize("put_threads", [2, 3])
def test_parallel_puts_stay_bit_exact_and_bounded(directory, monkeypatch, put_threads, put_process):
    """Several groups are put at once, never more than put_threads, and no staging buffer (a shared
    segment, with the putter) is refilled while its put is still running (each put waits before
    copying: a reused buffer would show as wrong bytes on the receiver)."""
    from actors.kv import transport

    owner, name = (putter.PutterClient, "put") if put_process else (transport.ray, "put")
    real_put, lock, running, peak = getattr(owner, name), threading.Lock(), [0], [0]

    def slow_put(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real_put(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(owner, name, slow_put)
    src = kv_layers(layers=9)
    cfg = FAST.model_copy(update={"put_threads": put_threads, "put_process": put_process})
    k = key()
    sent = publish(directory, k, src, tokens=33, cfg=cfg)
    monkeypatch.setattr(owner, name, real_put)
    dst = empty_like(src)
    rec = receive(directory, k, CopyInto(dst), cfg, **IDENT)
    assert rec.ok, rec.error
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert sent.groups == rec.groups == 5
    assert peak[0] == put_threads
    assert sent.send_s < sent.put_s  # the puts' times overlapped: their sum exceeds the wall
    assert ray.get(directory.stats.remote())["groups"] == 0


def test_the_putter_moves_the_same_bytes_and_the_engine_process_puts_none(directory, monkeypatch):
    """With put_process the groups (1 MiB: in the object store, not inline in the putter's reply)
    arrive exactly as without it, checksums compared, and every one was written by the putter:
    another process, while ray.put in this one raises."""
    from actors.kv import transport

    src = kv_layers(tokens=2000)  # 512 KiB a layer: groups of 2, 2 and 1 layers
    cfg = FAST.model_copy(update={"max_group_bytes": 1 << 20})
    got, puts_before = {}, ray.get(putter.client(1).actor.stats.remote())["puts"]
    for put_process in (False, True):
        if put_process:
            monkeypatch.setattr(transport.ray, "put", lambda *a, **kw: pytest.fail("ray.put in the engine's process"))
        k = key()
        sent = publish(directory, k, src, tokens=2000, cfg=cfg.model_copy(update={"put_process": put_process}))
        monkeypatch.undo()
        dst = empty_like(src)
        rec = receive(directory, k, CopyInto(dst), cfg, **IDENT)
        assert rec.ok, rec.error
        assert sent.groups == rec.groups == 3 and rec.put_s == pytest.approx(sent.put_s)
        got[put_process] = dst
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(src, got[False], got[True], strict=True))
    stats = ray.get(putter.client(1).actor.stats.remote())
    assert stats["pid"] != os.getpid() and stats["puts"] - puts_before == 3
    assert ray.get(directory.stats.remote())["groups"] == 0


def putter_gone(actor, timeout_s=30.0) -> bool:
    """Whether calls to `actor` fail within `timeout_s` (ray.kill takes effect asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.stats.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_the_putter_goes_away_when_the_engine_closes_and_its_objects_stay(directory):
    """Closing kills the putter; the objects it wrote are the engine's (the caller's) and outlive it."""
    src = kv_layers(tokens=2000)  # 1 MiB groups: in the object store, not inline in the reply
    cfg = FAST.model_copy(update={"put_process": True, "max_group_bytes": 1 << 20})
    for _ in range(2):  # a putter running since an earlier test (or started now), then one started by the first publish
        k = key()
        publish(directory, k, src, tokens=2000, cfg=cfg)
        actor = putter.client(1).actor
        assert ray.get(actor.stats.remote())["segments"] >= 1
        putter.close()
        assert putter_gone(actor)
        dst = empty_like(src)
        rec = receive(directory, k, CopyInto(dst), cfg, **IDENT)
        assert rec.ok, rec.error
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))


def test_a_full_dev_shm_is_one_line_naming_the_fix(directory, monkeypatch):
    """A segment /dev/shm cannot hold fails its publish at once (not as a SIGBUS inside the copy) and leaves no file."""
    putter.close()  # a fresh putter: no segment to reuse

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(putter.os, "posix_fallocate", full)
    cfg = FAST.model_copy(update={"put_process": True})
    with pytest.raises(RuntimeError, match=r"^kv_transfer.put_process: /dev/shm cannot hold a .* turn kv_transfer.put_process off$"):
        publish(directory, key(), kv_layers(), tokens=33, cfg=cfg)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"pdbench-kv-{os.getpid()}-")]


def test_put_process_is_a_validated_switch_that_reaches_the_connector():
    from actors.handoffs.spec import KVHandoffConfig

    assert KVTransferConfig().put_process is False
    assert KVHandoffConfig(put_process=True).transport().put_process is True
    with pytest.raises(pydantic.ValidationError, match="put_process"):
        KVTransferConfig(put_process="sometimes")


def test_groups_taken_together_are_fetched_with_one_wait(directory, monkeypatch):
    """A receiver that finds every group published makes them local in one round trip, not one per group."""
    from actors.kv import transport

    src = kv_layers(layers=9)
    k = key()
    publish(directory, k, src, tokens=33, cfg=FAST)
    real_wait, waits = ray.wait, []
    monkeypatch.setattr(transport.ray, "wait", lambda refs, **kw: waits.append(len(refs)) or real_wait(refs, **kw))
    dst = empty_like(src)
    rec = receive(directory, k, CopyInto(dst), FAST, **IDENT)
    assert rec.ok, rec.error
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert waits == [5] and rec.groups == 5
    assert ray.get(directory.stats.remote())["groups"] == 0


def test_layers_of_mixed_dtypes_and_shapes_travel_in_one_buffer(directory):
    """Engines with per-layer differences (hybrid attention, fp8 KV) still move one object per group."""
    src = [
        torch.arange(3, dtype=torch.int8),
        torch.randn(2, 5).to(torch.bfloat16),
        torch.randn(7, dtype=torch.float64),
        torch.randn(4, 3).to(torch.float8_e4m3fn),
    ]
    k = key()
    cfg = KVTransferConfig()
    publish(directory, k, src, tokens=1, cfg=cfg)
    dst = empty_like(src)
    rec = receive(directory, k, CopyInto(dst), cfg, **IDENT)
    assert rec.ok, rec.error
    assert rec.groups == 1
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(src, dst, strict=True))
    # offsets aligned to each dtype: 3 int8 bytes, pad 1, 20 bf16 bytes, pad 0, 56 float64 bytes, 12 fp8 bytes
    assert rec.bytes == 3 + 1 + 20 + 56 + 12


def test_layers_are_grouped_up_to_the_byte_budget():
    layer = lambda nbytes: torch.empty(nbytes, dtype=torch.uint8)  # noqa: E731
    assert layer_groups([layer(10)] * 5, 25) == [(0, 2), (2, 4), (4, 5)]
    assert layer_groups([layer(10)] * 5, 10**6) == [(0, 5)]  # a short context is one object
    assert layer_groups([layer(10), layer(100), layer(10), layer(10)], 25) == [(0, 1), (1, 2), (2, 4)]  # too big: alone
    assert layer_groups([layer(30)] * 3, 25) == [(0, 1), (1, 2), (2, 3)]


def test_one_take_hands_over_every_group_already_published(directory):
    """A finished publish reaches the receiver in one directory call, groups in order; a group not
    yet registered ends the batch."""
    k = key()
    publish(directory, k, kv_layers(), tokens=33, cfg=FAST)  # 3 groups
    got = ray.get(directory.take.remote(k, 0, 1.0))["groups"]
    assert [m.index for m, _ in got] == [0, 1, 2]
    assert ray.get(directory.stats.remote())["keys"] == 0  # all taken: forgotten
    k = key()
    meta = lambda i: GroupMeta(i, 3, i, (), (), (), 0, 0, 0.0, 0.0, 0.0, "n")  # noqa: E731
    for i in (0, 2):
        ray.get(directory.register.remote(k, i, 3, meta(i), []))
    assert [m.index for m, _ in ray.get(directory.take.remote(k, 0, 1.0))["groups"]] == [0]
    ray.get(directory.register.remote(k, 1, 3, meta(1), []))
    assert [m.index for m, _ in ray.get(directory.take.remote(k, 1, 1.0))["groups"]] == [1, 2]


def test_a_receive_that_fails_halfway_settles_its_copies_first(directory):
    """Copies already queued must finish before the caller frees or reuses their destination."""

    class Fragile(CopyInto):
        settled = 0

        def __call__(self, layer, host):
            if layer == 3:
                raise ValueError("layer 3 does not fit")
            super().__call__(layer, host)

        def settle(self):
            Fragile.settled += 1
            super().settle()

    src = kv_layers()
    k = key()
    publish(directory, k, src, tokens=33, cfg=FAST)
    rec = receive(directory, k, Fragile(empty_like(src)), FAST, **IDENT)
    assert not rec.ok and "layer 3 does not fit" in rec.error
    assert Fragile.settled == 1


def test_record_is_the_transfers_parquet_row():
    """Every field is a column of its type (the orchestrator adds `backend`, the cell `warmup`); a field that may be
    None is a nullable column."""
    arrow = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    hints = typing.get_type_hints(TransferRecord)
    own = [c for c in TRANSFERS.columns if c.name not in ("backend", "warmup")]
    assert tuple(f.name for f in dataclasses.fields(TransferRecord)) == tuple(c.name for c in own)
    for col in own:
        kinds = typing.get_args(hints[col.name]) or (hints[col.name],)
        assert arrow[next(k for k in kinds if k is not type(None))] == col.type, col.name
        assert col.nullable or type(None) not in kinds, col.name


def test_receiver_waits_for_a_sender_that_comes_later(directory):
    src = kv_layers(layers=4)
    k = key()
    sender = threading.Timer(0.4, lambda: publish(directory, k, src, tokens=33, cfg=FAST))
    sender.start()
    dst = empty_like(src)
    rec = receive(directory, k, CopyInto(dst), FAST, **IDENT)
    sender.join()
    assert rec.ok, rec.error
    assert rec.wait_ref_s >= 0.2  # it really waited for the reference, and that shows as stall
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))


@ray.remote(num_cpus=0)
class Owner:
    """A separate process that owns the objects it publishes (like a prefill actor)."""

    def publish(self, directory_name, k, tokens, cfg=FAST):
        publish(find_directory(directory_name), k, kv_layers(tokens=tokens), tokens=tokens, cfg=cfg)
        return True


def _directory_name(directory):
    return ray.get(directory.__ray_call__.remote(lambda self: ray.get_runtime_context().get_actor_name()))


@pytest.mark.parametrize("put_process", [False, True], ids=["in_process", "putter"])
def test_lost_object_when_its_owner_dies(directory, put_process):
    """The sender's process owns its objects, also when its putter wrote them: they go with it."""
    owner = Owner.remote()
    ray.get(owner.__ray_ready__.remote())
    k = key()
    before = _store_bytes_used()
    cfg = FAST.model_copy(update={"put_process": put_process})
    ray.get(owner.publish.remote(_directory_name(directory), k, 2000, cfg))  # 2000 tokens: 1 MiB objects in plasma
    assert _store_bytes_used() > before
    ray.kill(owner)
    # Until Ray notices the owner is gone its objects may still be read; wait until they are freed.
    deadline = time.monotonic() + 30
    while _store_bytes_used() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    rec = receive(directory, k, CopyInto(empty_like(kv_layers(tokens=2000))), FAST, **IDENT)
    assert not rec.ok
    assert "OwnerDiedError" in rec.error or "ObjectLostError" in rec.error, rec.error
    stats = ray.get(directory.stats.remote())
    assert stats["groups"] == 0  # what was left of the key was dropped


def test_no_reference_in_time(directory):
    rec = receive(directory, key(), CopyInto(empty_like(kv_layers())), FAST, **IDENT)
    assert not rec.ok
    assert rec.error == "KVUnavailable: no reference for layer group 0 within 1 s"
    assert rec.wait_ref_s == pytest.approx(1.0, abs=0.5) and rec.fetch_s is None and rec.bytes == 0


@ray.remote(num_cpus=0)
def _never_ready():
    time.sleep(3600)


def test_fetch_timeout(directory):
    k = key()
    stuck = _never_ready.remote()
    meta = GroupMeta(0, 1, 0, ((2, 2, 33, 16),), ("float32",), (0,), 33, 8448, 0.0, 0.0, 0.0, "nowhere")
    assert ray.get(directory.register.remote(k, 0, 1, meta, [stuck]))
    rec = receive(directory, k, CopyInto(empty_like(kv_layers(layers=1))), FAST, **IDENT)
    ray.cancel(stuck, force=True)
    assert not rec.ok
    assert rec.error == "KVUnavailable: fetch of layer group 0 timed out after 1 s"
    assert rec.fetch_s >= 0.9


def test_sender_failure_reaches_the_receiver(directory):
    k = key()
    ray.get(directory.fail.remote(k, "RuntimeError: CUDA out of memory"))
    rec = receive(directory, k, CopyInto(empty_like(kv_layers())), FAST, **IDENT)
    assert rec.error == "KVUnavailable: sender failed: RuntimeError: CUDA out of memory"


def test_kv_that_does_not_fit_is_refused(directory):
    k = key()
    publish(directory, k, kv_layers(tokens=10), tokens=10, cfg=FAST)
    rec = receive(directory, k, CopyInto(empty_like(kv_layers(tokens=12))), FAST, **IDENT)
    assert not rec.ok and "layer 0: received (2, 2, 10, 16)" in rec.error
    assert ray.get(directory.stats.remote())["groups"] == 0


def test_late_groups_of_an_abandoned_key_are_refused(directory):
    k = key()
    assert ray.get(directory.drop.remote(k)) == 0
    meta = GroupMeta(0, 1, 0, (), (), (), 0, 0, 0.0, 0.0, 0.0, "n")
    assert ray.get(directory.register.remote(k, 0, 1, meta, [ray.put(1)])) is False
    assert ray.get(directory.stats.remote())["groups"] == 0


def _store_bytes_used():
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used


def test_nothing_accumulates_over_a_long_sweep(directory):
    """60 transfers of 1 MiB each (successful, and some abandoned halfway) leave the object store
    where it started: every object is freed once its receiver is done with it."""
    before = _store_bytes_used()
    src = kv_layers(layers=4, heads=4, tokens=1024, head_dim=16)  # 4 × 512 KiB
    assert sum(t.numel() * 4 for t in src) == 2 * 1024 * 1024
    for i in range(60):
        k = key()
        publish(directory, k, src, tokens=1024, cfg=FAST)
        if i % 10 == 9:  # the receiver gives up: what was published must go too
            ray.get(directory.drop.remote(k))
            continue
        assert receive(directory, k, CopyInto(empty_like(src)), FAST, **IDENT).ok
    deadline = time.monotonic() + 30
    while _store_bytes_used() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _store_bytes_used() <= before
    stats = ray.get(directory.stats.remote())
    assert stats["groups"] == 0 and stats["keys"] == 0


class _Fake:
    def __init__(self, *a, **kw):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append((value, tags))

    observe = inc


def test_metrics_are_tagged_by_run_cell_and_role(monkeypatch):
    fakes = {k: _Fake() for k in ("bytes", "transfers", "size", "stage")}
    monkeypatch.setattr(accounting, "_metrics", fakes)
    accounting.observe_send(accounting.SendStats("k", 10, 2, 4096, 0.25, 0.5, 0.8, "n1"), "run1", "cellA")
    rec = TransferRecord(
        "run1",
        "cellA",
        "r1",
        "k",
        tokens=10,
        groups=2,
        bytes=4096,
        wait_ref_s=0.1,
        fetch_s=0.2,
        get_s=0.01,
        inject_s=0.02,
        total_s=0.4,
        stall_s=0.3,
        ok=True,
    )
    accounting.observe_receive(rec)
    assert fakes["bytes"].calls == [
        (4096.0, {"run": "run1", "cell": "cellA", "role": "prefill"}),
        (4096.0, {"run": "run1", "cell": "cellA", "role": "decode"}),
    ]
    assert fakes["transfers"].calls == [(1.0, {"run": "run1", "cell": "cellA", "role": "decode", "ok": "true"})]
    stages = {(t["role"], t["stage"]): v for v, t in fakes["stage"].calls}
    assert stages == {
        ("prefill", "extract"): 0.25,
        ("prefill", "put"): 0.5,
        ("decode", "wait_ref"): 0.1,
        ("decode", "fetch"): 0.2,
        ("decode", "get"): 0.01,
        ("decode", "inject"): 0.02,
        ("decode", "total"): 0.4,
        ("decode", "stall"): 0.3,
    }
    assert fakes["size"].calls == [(4096.0, {"run": "run1", "cell": "cellA", "role": "decode"})]


def test_metrics_reach_the_ray_metrics_endpoint(directory):
    """The real path: a transfer in this process shows up in the node's Prometheus export
    (2 layers × 2 (K, V) × 2 heads × 33 tokens × 16 × 4 bytes = 16,896 bytes each way)."""
    import urllib.request

    run = f"run{secrets.token_hex(3)}"
    src = kv_layers(layers=2)
    k = key()
    publish(directory, k, src, tokens=33, cfg=FAST, run_id=run, cell_id="c")
    assert receive(directory, k, CopyInto(empty_like(src)), FAST, run_id=run, cell_id="c", request_id="r").ok
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 60
    found: list[str] = []
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        found = [line for line in text.splitlines() if f'run="{run}"' in line and line.startswith("ray_pdbench_kv_bytes")]
        if len(found) >= 2:
            break
        time.sleep(1)
    assert any('role="prefill"' in line and line.endswith(" 16896.0") for line in found), found
    assert any('role="decode"' in line and line.endswith(" 16896.0") for line in found), found


# --- Ray Direct Transport (NIXL): the same pipeline and accounting, the bytes outside the object store
# Every NIXL agent lives in an actor or a one-call task, never in this process: an agent's UCX
# progress thread keeps a core busy for as long as its process lives (measured: 3.0 CPU-s per 3 s idle).
@ray.remote(num_cpus=0)
class NixlSender:
    """A prefill-like sender process: it owns what it publishes, and publishes in a thread while
    its event loop stays free (Ray frees an actor's RDT objects with a task on the actor)."""

    async def publish(self, directory_name, k, cfg, dtype=torch.float32):
        def send():  # kv_layers() is seeded: the test builds the same layers to compare
            return publish(find_directory(directory_name), k, kv_layers(dtype=dtype), tokens=33, cfg=cfg, tensor_transport="nixl")

        return await asyncio.to_thread(send)

    def held(self):
        """RDT objects this process still holds (the sender's side of every NIXL put it made)."""
        store = ray.worker.global_worker.rdt_manager.rdt_store
        return sum(1 for q in store._rdt_store.values() if q)


@ray.remote(num_cpus=0, max_calls=1)
def _receive_elsewhere(name, k, shapes, dtype, cfg):
    """A receiver in another process (one call: its NIXL agent goes with it)."""
    dst = [torch.empty(s, dtype=dtype) for s in shapes]
    rec = receive(find_directory(name), k, CopyInto(dst), cfg, **IDENT)
    return rec, dst


@ray.remote(num_cpus=0, max_calls=1)
def _receive_twice_elsewhere(name, keys, shapes, dtype, cfg):
    """Two receives in one process, and how many NIXL receive buffers it had registered after each."""
    from actors.kv import rdt

    out = []
    for k in keys:
        dst = [torch.empty(s, dtype=dtype) for s in shapes]
        rec = receive(find_directory(name), k, CopyInto(dst), cfg, **IDENT)
        out.append((rec, dst, rdt.RECEIVE.count()))
    return out


def _all_freed(sender) -> int:
    deadline = time.monotonic() + 10  # the sender's buffers go once the last reference is gone
    while (n := ray.get(sender.held.remote())) and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def test_nixl_tensor_transport_is_bit_exact_accounted_and_freed(directory):
    src = kv_layers(dtype=torch.bfloat16)
    k, name = key(), _directory_name(directory)
    sender = NixlSender.remote()
    before = _store_bytes_used()
    sent = ray.get(sender.publish.remote(name, k, FAST, torch.bfloat16))
    assert _store_bytes_used() - before < sent.bytes  # descriptors in the object store, not the KV
    rec, dst = ray.get(_receive_elsewhere.remote(name, k, [t.shape for t in src], torch.bfloat16, FAST))
    assert rec.ok, rec.error
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert rec.groups == sent.groups == 2 and rec.bytes == sent.bytes == 5 * LAYER_BYTES // 2
    assert rec.put_s == pytest.approx(sent.put_s) and rec.get_s > 0 and rec.src_node == rec.dst_node
    assert ray.get(directory.stats.remote())["groups"] == 0
    assert _all_freed(sender) == 0
    ray.kill(sender)


def test_nixl_receive_buffers_are_registered_once_and_reused(directory):
    src = kv_layers()
    name, keys, sender = _directory_name(directory), [key(), key()], NixlSender.remote()
    for k in keys:
        ray.get(sender.publish.remote(name, k, FAST))
    got = ray.get(_receive_twice_elsewhere.remote(name, keys, [t.shape for t in src], torch.float32, FAST))
    for rec, dst, _ in got:
        assert rec.ok, rec.error
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert 0 < got[0][2] <= got[0][0].groups and got[1][2] == got[0][2]  # the second transfer made no new buffer
    assert _all_freed(sender) == 0
    ray.kill(sender)


def test_a_receive_buffer_comes_back_only_after_its_fence(monkeypatch):
    """No NIXL here: registration is recorded, not done (an agent would keep a core of this process busy)."""
    import ray.experimental

    from actors.kv import rdt

    registered = []
    monkeypatch.setattr(ray.experimental, "register_nixl_memory", registered.append)

    class Fence:
        done = False

        def query(self):
            return self.done

    made = []

    def make(device, nbytes):  # rdt.fresh_buffer on a GPU: a block no engine kernel can still write
        made.append(rdt.fresh_buffer(device, nbytes))
        return made[-1]

    pool, cpu = rdt.ReceiveBuffers(make), torch.device("cpu")
    a = pool.take(cpu, 64)
    fence = Fence()
    pool.give(a, fence)
    b = pool.take(cpu, 64)  # a's reads are still queued: a new buffer
    assert b is not a and len(registered) == pool.count() == 2
    fence.done = True
    assert pool.take(cpu, 64) is a  # now a is free again, no new registration
    pool.give(b, None)
    assert pool.take(cpu, 32) is not b and pool.take(cpu, 64) is b and pool.count() == 3  # sizes do not mix
    assert [id(x) for x in made] == [id(x) for x in registered]  # every new buffer made fresh, none on reuse
    assert made[0].dtype == torch.uint8 and made[0].numel() == 64


def test_nixl_kv_nobody_takes_is_freed_with_its_key(directory):
    k, sender = key(), NixlSender.remote()
    ray.get(sender.publish.remote(_directory_name(directory), k, FAST))
    assert ray.get(sender.held.remote()) > 0
    ray.get(directory.drop.remote(k))
    assert _all_freed(sender) == 0
    ray.kill(sender)


def test_a_put_into_a_full_nixl_pool_waits_for_room_until_its_deadline(monkeypatch):
    """Receivers free pool blocks as they take their groups: a full pool is waited out, not failed at once."""
    from actors.kv import rdt

    class NixlOutOfMemoryError(RuntimeError):
        pass

    calls = []

    def put(value, _tensor_transport=None):
        calls.append(_tensor_transport)
        if len(calls) < 3:
            raise NixlOutOfMemoryError("NIXL memory pool out of memory: cannot allocate 1 tensor(s)")
        return "ref"

    monkeypatch.setattr(rdt, "_prepare", lambda device, pool_bytes: None)
    monkeypatch.setattr(rdt.ray, "put", put)
    assert rdt.put(torch.zeros(4), 2**20, time.monotonic() + 5) == "ref" and calls == ["nixl"] * 3
    calls.clear()
    with pytest.raises(NixlOutOfMemoryError):
        rdt.put(torch.zeros(4), 2**20, time.monotonic() - 1)  # past its deadline: the reason goes to the receiver
    monkeypatch.setattr(rdt.ray, "put", lambda value, _tensor_transport=None: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):
        rdt.put(torch.zeros(4), 2**20, time.monotonic() + 5)  # anything else is not waited out


def test_a_nixl_pool_that_stays_full_fails_the_send_with_its_reason(directory):
    name = _directory_name(directory)
    cfg = FAST.model_copy(update={"rdt_pool_bytes": 2**20, "ref_timeout_s": 0.5})
    sender = NixlSender.remote()  # a process of its own: its pool (one per process) has this size
    keys = [key() for _ in range(2 + 2**20 // (5 * LAYER_BYTES))]
    errors = []
    for ref in [sender.publish.remote(name, k, cfg) for k in keys]:
        try:
            ray.get(ref)
            errors.append(None)
        except Exception as e:
            errors.append(str(e))
    assert None in errors and any(e and "out of memory" in e for e in errors), errors  # some fit, the rest gave up
    for k in keys:
        ray.get(directory.drop.remote(k))
    ray.kill(sender)


def test_a_failure_reason_keeps_the_cause_ray_puts_on_later_lines():
    from actors.kv.transport import reason_of

    e = RuntimeError(
        "The NIXL transfer failed for object id: 00ab.\nThe exception thrown from nixl transfer was:\n  NIXL_ERR_REMOTE_DISCONNECT\n"
    )
    assert (
        reason_of(e) == "RuntimeError: The NIXL transfer failed for object id: 00ab. "
        "The exception thrown from nixl transfer was: NIXL_ERR_REMOTE_DISCONNECT"
    )
    assert len(reason_of(RuntimeError("x" * 5000))) == 600
