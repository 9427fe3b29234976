"""The vLLM connector's asynchronous loads and saves, driven by a fake scheduler that enforces
vLLM 0.26's rules for async KV connectors (vllm/v1/core/sched/scheduler.py):

- a consumer whose load is asynchronous waits (WAITING_FOR_REMOTE_KVS) with its blocks allocated
  until its id comes back in `finished_recving`; the engine keeps stepping other requests;
- every reported id must be a request the scheduler still holds (`assert req_id in
  self.requests`): an unknown or twice-reported id fails the test, as it kills vLLM's EngineCore;
- failed blocks are matched against waiting loads in the pass they arrive (policy "fail": the
  request ends FINISHED_ERROR, its blocks freed when its id comes back);
- a producer whose save was planned keeps its blocks after it finishes until `finished_sending`;
- an aborted request that is waiting for its KV keeps its blocks until `finished_recving`;
- finished ids reach the worker one step later (`finished_req_ids`).

The real TransferBook (scheduler side), ConnectorWorker (worker side) and object-store transport
run on CPU tensors; only vLLM's scheduler is replaced.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import ray
import torch

from actors.kv import putter
from actors.kv.blocks import TransferBook, transferable_tokens
from actors.kv.directory import directory_actor
from actors.kv.jobs import ConnectorWorker
from actors.kv.spec import KVTransferConfig
from actors.kv.transport import as_bytes, pack, unpack
from tests.test_kv_transport import putter_gone

BS, LAYERS, BLOCKS = 4, 3, 96
PROMPT = 5 * BS + 1  # 5 whole blocks move, the last token is computed by the decode engine
CFG = KVTransferConfig(max_group_bytes=1500, ref_timeout_s=20, fetch_timeout_s=20, worker_threads=3)


def content(rid: str, layer: int, n_blocks: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((rid.split(":")[0], layer)) % 2**31)
    return torch.randn(n_blocks, 2, BS, 8, generator=g)


@dataclass
class Req:
    rid: str
    prompt_len: int
    params: dict
    max_tokens: int
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    out: int = 0
    status: str = "waiting"  # waiting | waiting_remote | running | finished_*
    new: bool = True


class FakeEngine:
    """One engine: vLLM 0.26's scheduler rules around the real connector parts."""

    def __init__(self, name: str, directory, cfg: KVTransferConfig = CFG):
        self.book = TransferBook(BS)
        self.worker = ConnectorWorker(cfg, directory, run_id="t", cell_id="c", engine=name)
        self.caches = [torch.zeros(BLOCKS, 2, BS, 8) for _ in range(LAYERS)]
        self.worker.register(self.caches, 0)
        self.free = list(range(BLOCKS))
        self.requests: dict[str, Req] = {}
        self.finished_recving: set[str] = set()
        self.finished_ids: set[str] = set()
        self.reported: Counter = Counter()
        self.ended: dict[str, str] = {}
        self.loaded_ok: dict[str, bool] = {}
        self.steps = 0
        self.after_layer: Callable[[int], None] = lambda layer: None  # runs inside the forward, after each layer

    def add(self, rid: str, params: dict, max_tokens: int, prompt_len: int = PROMPT) -> None:
        self.requests[rid] = Req(rid, prompt_len, params, max_tokens)
        self.book.new_request(rid, params, prompt_len)

    def _alloc(self, n: int) -> list[int]:
        assert len(self.free) >= n, "out of blocks: something leaks"
        out, self.free = self.free[:n], self.free[n:]
        return out

    def _release(self, r: Req) -> None:
        self.free.extend(r.blocks)
        del self.requests[r.rid]

    def finish(self, r: Req, status: str) -> None:
        delay = False
        if r.status == "waiting_remote":  # the scheduler holds the blocks until the load reports
            delay = r.rid not in self.finished_recving
            self.finished_recving.discard(r.rid)
        r.status = f"finished_{status}"
        self.ended[r.rid] = status
        delay |= self.book.finished(r.rid)
        self.finished_ids.add(r.rid)
        if not delay:
            self._release(r)

    def abort(self, rid: str) -> None:
        r = self.requests[rid]
        if not r.status.startswith("finished"):
            self.finish(r, "aborted")

    def step(self) -> None:
        self.steps += 1
        new, cached, computing = [], [], []
        for r in list(self.requests.values()):
            if r.status == "waiting_remote":
                if r.rid in self.finished_recving:  # promoted: blocks hold the KV now
                    self.finished_recving.discard(r.rid)
                    n = transferable_tokens(r.prompt_len, BS) // BS
                    want = [content(r.rid, li, n) for li in range(LAYERS)]
                    self.loaded_ok[r.rid] = all(torch.equal(self.caches[li][r.blocks[:n]], want[li]) for li in range(LAYERS))
                    r.status = "waiting"
                continue
            if r.status == "waiting" and r.computed == 0:
                n = self.book.matched_tokens(r.rid, r.params, r.prompt_len, 0)
                if n > 0:
                    r.blocks = self._alloc(n // BS)
                    self.book.allocated(r.rid, r.params, r.prompt_len, list(r.blocks), n)
                    r.computed, r.status = n, "waiting_remote"
                    continue
            if r.status == "waiting":
                need = -(-(r.prompt_len + 1) // BS) - len(r.blocks)  # decode blocks are not modelled
                got = self._alloc(need)
                r.blocks += got
                sched = r.prompt_len - r.computed
                (new if r.new else cached).append((r.rid, list(r.blocks) if r.new else got, r.computed, sched))
                r.new, r.status = False, "running"
                computing.append(r)
            elif r.status == "running":
                cached.append((r.rid, None, r.computed, 1))
                computing.append(r)
        plan = self.book.plan(new, cached)
        self.worker.start_loads(plan)
        scheduled = [self.requests[rid] for rid, *_ in new + cached]
        producers = [r for r in scheduled if r.params.get("pdbench_role") == "producer" and r.computed < r.prompt_len]
        for li in range(LAYERS):  # the forward pass, layer by layer: the producers' prompt KV is written
            for r in producers:
                n = transferable_tokens(r.prompt_len, BS) // BS
                self.caches[li][r.blocks[:n]] = content(r.rid, li, n)
            self.worker.layer_saved(li)  # vLLM's save_kv_layer
            if producers:
                self.after_layer(li)
        self.worker.start_saves(plan)
        sending, recving = self.worker.finished(self.finished_ids)
        failed = self.worker.load_errors()
        self.finished_ids = set()
        # update_from_output: invalid blocks first (policy "fail"), then the step's tokens, then
        # the connector's finished ids.
        for r in list(self.requests.values()):
            if r.status == "waiting_remote" and failed & set(r.blocks):
                self.finish(r, "error")
        for r in computing:
            if r.status != "running":
                continue
            r.computed = r.prompt_len
            r.out += 1
            if r.out >= r.max_tokens:
                self.finish(r, "stopped")
        for rid in recving or ():
            self.reported["recv", rid] += 1
            assert rid in self.requests, f"finished_recving names {rid}, which vLLM no longer holds"
            r = self.requests[rid]
            if r.status == "waiting_remote":
                self.finished_recving.add(rid)
            else:
                assert r.status.startswith("finished"), r
                self._release(r)
        for rid in sending or ():
            self.reported["send", rid] += 1
            assert rid in self.requests, f"finished_sending names {rid}, which vLLM no longer holds"
            self._release(self.requests[rid])
        self.book.worker_finished(sending or (), recving or ())
        assert all(v == 1 for v in self.reported.values()), self.reported

    def idle(self) -> bool:
        return not self.requests


def run(engines, until, timeout_s=30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the engines never finished: a load or save was never reported"
        for e in engines:
            e.step()
        time.sleep(0.001)  # vLLM's idle step sleeps 1 ms so that transfer threads get the GIL


LAYERWISE = CFG.model_copy(update={"save": "layerwise"})
PUT_PROCESS = LAYERWISE.model_copy(update={"put_process": True, "put_threads": 2})


@pytest.fixture
def pair(ray_local, request):
    name = f"kv-async-{request.node.name}"[:60]
    d = directory_actor(name)
    p, dec = FakeEngine("prefill", d, getattr(request, "param", CFG)), FakeEngine("decode", d)
    yield d, p, dec
    for e in (p, dec):
        e.worker.shutdown()
    ray.kill(d)


def key(i: int) -> str:
    return f"r{i}/k"


@pytest.mark.parametrize("pair", [CFG, LAYERWISE, PUT_PROCESS], ids=["after_forward", "layerwise", "put_process"], indirect=True)
def test_loads_and_saves_run_off_the_step_and_report_once(pair):
    d, p, dec = pair
    n = 6
    puts_before = ray.get(putter.client(1).actor.stats.remote())["puts"] if p.worker.cfg.put_process else 0
    for i in range(n):
        p.add(f"r{i}:prefill", {"pdbench_role": "producer", "key": key(i)}, max_tokens=1)
    dec.add("busy", {}, max_tokens=10_000)  # keeps decoding all along
    run([p], lambda: all(rid in p.ended for rid in (f"r{i}:prefill" for i in range(n))))
    for i in range(n):
        dec.add(f"r{i}", {"pdbench_role": "consumer", "key": key(i)}, max_tokens=3)
    busy_steps = dec.steps
    run([p, dec], lambda: p.idle() and all(f"r{i}" in dec.ended for i in range(n)))
    assert dec.steps - busy_steps >= 3  # the decode engine stepped on while loads were in flight
    assert dec.loaded_ok == {f"r{i}": True for i in range(n)}  # bit-exact KV in the consumers' blocks
    assert {dec.ended[f"r{i}"] for i in range(n)} == {"stopped"}
    assert sorted(rid for (kind, rid) in p.reported if kind == "send") == sorted(f"r{i}:prefill" for i in range(n))
    assert sorted(rid for (kind, rid) in dec.reported if kind == "recv") == sorted(f"r{i}" for i in range(n))
    dec.abort("busy")
    run([p, dec], lambda: dec.idle())
    assert len(p.free) == len(dec.free) == BLOCKS  # every block back
    assert p.book.open() == dec.book.open() == {"saving": 0, "loading": 0, "producers": 0}
    assert dec.worker.pending() == {"loads": 0, "saves": 0}
    stats = ray.get(d.stats.remote())
    assert stats["keys"] == 0 and stats["groups"] == 0
    rows = [ray.get(d.take_report.remote(key(i), 5.0)) for i in range(n)]
    assert all(r["ok"] and r["status"] == "ok" and r["groups"] == LAYERS for r in rows), rows
    assert all(r["kv_wait_s"] >= r["queued_s"] >= 0 and r["ready_to_injected_s"] > 0 for r in rows)
    engines = ray.get(d.engines.remote())
    assert engines["decode"]["loads"] == n and engines["prefill"]["saves"] == n
    assert 0 < engines["decode"]["blocked_s"] < 1.0
    if p.worker.cfg.put_process:  # the saves went through the putter, which goes with the engine
        actor = putter.client(1).actor
        assert ray.get(actor.stats.remote())["puts"] - puts_before == n * LAYERS
        p.worker.shutdown()
        assert putter_gone(actor)


@pytest.mark.parametrize("pair", [LAYERWISE], ids=["layerwise"], indirect=True)
def test_layerwise_save_publishes_a_group_while_the_forward_is_still_writing_later_layers(pair):
    d, p, dec = pair
    seen: dict[int, int] = {}

    def after_layer(layer: int) -> None:  # the forward goes on only once the layer's group is out
        deadline = time.monotonic() + 10
        while (registered := ray.get(d.status.remote(key(5)))["registered"]) <= layer and time.monotonic() < deadline:
            time.sleep(0.01)
        seen[layer] = registered

    p.after_layer = after_layer
    p.add("r5:prefill", {"pdbench_role": "producer", "key": key(5)}, max_tokens=1)
    run([p], lambda: p.idle())
    assert seen == {0: 1, 1: 2, 2: 3}  # one layer per group here: each left before the next layer was written
    dec.add("r5", {"pdbench_role": "consumer", "key": key(5)}, max_tokens=3)
    run([dec], lambda: dec.idle())
    assert dec.loaded_ok == {"r5": True}
    row = ray.get(d.take_report.remote(key(5), 5.0))
    assert row["ok"] and row["groups"] == LAYERS and row["ready_to_injected_s"] > 0


@pytest.mark.parametrize("pair", [LAYERWISE], ids=["layerwise"], indirect=True)
def test_layerwise_save_without_layer_hooks_is_gathered_at_wait_for_save(pair):
    _, p, dec = pair
    p.worker.layer_saved = lambda index: None  # no hook ran: the pass ends with wait_for_save alone
    p.add("r6:prefill", {"pdbench_role": "producer", "key": key(6)}, max_tokens=1)
    run([p], lambda: p.idle())  # wait_for_save gathers every layer: the save completes all the same
    dec.add("r6", {"pdbench_role": "consumer", "key": key(6)}, max_tokens=3)
    run([dec], lambda: dec.idle())
    assert dec.loaded_ok == {"r6": True} and len(p.free) == BLOCKS


def test_abort_mid_load_cancels_it_and_reports_it_once(pair):
    d, _p, dec = pair
    dec.add("r1", {"pdbench_role": "consumer", "key": key(1)}, max_tokens=3)  # its producer never publishes
    run([dec], lambda: dec.requests["r1"].status == "waiting_remote")
    run([dec], lambda: dec.worker.pending()["loads"] == 1)
    t0 = time.monotonic()
    dec.abort("r1")
    run([dec], lambda: dec.idle(), timeout_s=10)
    assert time.monotonic() - t0 < 5  # not the 20 s reference timeout
    assert dec.reported[("recv", "r1")] == 1 and len(dec.free) == BLOCKS
    row = ray.get(d.take_report.remote(key(1), 5.0))
    assert row["status"] == "cancelled" and not row["ok"], row
    assert dec.book.open()["loading"] == 0


def test_failed_publish_fails_the_load_with_its_blocks_in_the_same_pass(pair):
    d, _p, dec = pair
    ray.get(d.fail.remote(key(2), "RuntimeError: device lost"))
    dec.add("r2", {"pdbench_role": "consumer", "key": key(2)}, max_tokens=3)
    run([dec], lambda: dec.idle())
    assert dec.ended["r2"] == "error" and dec.reported[("recv", "r2")] == 1
    row = ray.get(d.take_report.remote(key(2), 5.0))
    assert row["status"] == "failed" and "device lost" in row["error"]


def test_tampered_kv_fails_its_checksum(pair):
    d, p, dec = pair
    p.add("r3:prefill", {"pdbench_role": "producer", "key": key(3)}, max_tokens=1)
    run([p], lambda: p.idle())  # blocks released after the gather: the publish may still run
    run([], lambda: ray.get(d.status.remote(key(3)))["registered"] == LAYERS)
    entry = ray.get(d.take.remote(key(3), 0, 10.0))
    for meta, refs in entry["groups"]:
        layers = [t.clone() for t in unpack(as_bytes(ray.get(refs[0])), meta)]
        if meta.index == 1:
            layers[0][0, 0, 0, 0] += 1.0  # one value in one block of one layer
        buf, _ = pack(layers)
        assert ray.get(d.register.remote(key(3), meta.index, meta.groups, meta, [ray.put(buf.numpy())]))
    dec.add("r3", {"pdbench_role": "consumer", "key": key(3)}, max_tokens=3)
    run([dec], lambda: dec.idle())
    assert dec.ended["r3"] == "error"
    row = ray.get(d.take_report.remote(key(3), 5.0))
    assert "checksum mismatch in layers 1..1" in row["error"], row


def test_consumer_that_never_loads_frees_what_was_published(pair):
    d, p, dec = pair
    p.add("r4:prefill", {"pdbench_role": "producer", "key": key(4)}, max_tokens=1)
    run([p], lambda: p.idle())
    run([], lambda: ray.get(d.stats.remote())["groups"] == LAYERS)
    dec.add("r4", {"pdbench_role": "consumer", "key": key(4)}, max_tokens=3)
    dec.abort("r4")  # before the scheduler ever looked at it
    dec.step()
    deadline = time.monotonic() + 5
    while ray.get(d.stats.remote())["groups"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.get(d.stats.remote())["groups"] == 0


def test_preempted_producer_saves_the_blocks_it_resumed_with():
    book = TransferBook(BS)
    book.new_request("p", {"pdbench_role": "producer", "key": "k"}, 13)
    assert book.plan([("p", [1, 2], 0, 8)]).saves == []  # chunk 1: 8 of 13 tokens
    # preempted, then resumed: vLLM hands the new block list, which replaces the old one
    saves = book.plan([], [("p", [7, 8, 9, 10], 0, 13)], resumed={"p"}).saves
    assert [(t.block_ids, t.tokens) for t in saves] == [([7, 8, 9], 12)]
    assert book.finished("p") is True  # save planned: keep the blocks until it is reported
    book.worker_finished(sending=["p"])
    assert book.open()["saving"] == 0


def test_directory_expires_keys_nobody_took(ray_local):
    d = directory_actor("kv-async-ttl", ttl_s=0.0)
    ray.get(d.register.remote("old/k", 0, 1, None, [ray.put(b"x")]))
    time.sleep(5.2)  # the sweep runs at most every 5 s
    ray.get(d.register.remote("new/k", 0, 1, None, [ray.put(b"y")]))
    st = ray.get(d.stats.remote())
    assert st["expired"] >= 1 and st["groups"] <= 1
    ray.kill(d)


def test_replace_keeps_checksum_semantics():
    """The checksum sees swapped blocks, not only changed bytes."""
    from actors.kv.transport import kv_checksum

    a = torch.randn(4, 2, BS, 8)
    b = a[[1, 0, 2, 3]].clone()
    assert kv_checksum([a]) == kv_checksum([a.clone()])
    assert kv_checksum([a]) != kv_checksum([b])
    assert kv_checksum([a, b]) != kv_checksum([b, a])
    assert dataclasses.is_dataclass(Req)
