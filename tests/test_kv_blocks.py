"""The vLLM connector's decisions and block moves, without vLLM: paged KV → gather → transport →
inject into other block ids must be bit-exact (research notes §10, check 1)."""

import pytest
import ray
import torch

from actors.kv.blocks import BlockInjector, TransferBook, block_dim, gather_blocks, transferable_tokens
from actors.kv.directory import directory_actor
from actors.kv.spec import KVTransferConfig
from actors.kv.transport import publish, receive

BS = 16


@pytest.mark.parametrize("n,want", [(1, 0), (16, 0), (17, 16), (33, 32), (48, 32), (49, 48)])
def test_transferable_tokens_leave_the_last_token(n, want):
    assert transferable_tokens(n, BS) == want


def test_block_dim_from_shape():
    assert block_dim((100, 8, 16, 256), 100) == 0
    assert block_dim((2, 100, 16, 8, 128), 100) == 1
    assert block_dim((100, 8, 16, 256), None) == 0


def test_consumer_loads_whole_blocks_once():
    book = TransferBook(BS)
    p = {"pdbench_role": "consumer", "key": "r1/x"}
    assert book.matched_tokens("r1", p, 40, 0) == 32
    assert book.matched_tokens("r1", p, 40, 0) == 32  # asking twice changes nothing
    book.allocated("r1", p, 40, [7, 3, 9], 32)
    plan = book.plan([])
    assert [(t.key, t.block_ids, t.tokens) for t in plan.loads] == [("r1/x", [7, 3], 32)]
    assert book.plan([]).loads == []  # a plan is handed out once
    assert book.matched_tokens("r1", p, 40, 0) == 0  # preempted later: recompute, never reload
    book.finished("r1")
    assert book.matched_tokens("r1", p, 40, 0) == 32


def test_requests_without_params_are_left_alone():
    book = TransferBook(BS)
    book.new_request("a", {}, 100)
    assert book.matched_tokens("a", {}, 100, 0) == 0
    book.allocated("a", {}, 100, [1, 2], 0)
    plan = book.plan([("a", [1, 2, 3, 4, 5, 6, 7], 0, 100)])
    assert plan.loads == [] and plan.saves == []


def test_producer_saves_after_the_step_that_completes_the_prompt():
    book = TransferBook(BS)
    book.new_request("p", {"pdbench_role": "producer", "key": "k"}, 40)
    plan = book.plan([("p", [5, 6, 8], 0, 40)])
    assert [(t.key, t.block_ids, t.tokens) for t in plan.saves] == [("k", [5, 6], 32)]
    assert book.plan([]).saves == []


def test_chunked_prompt_is_saved_whole_at_its_last_chunk():
    book = TransferBook(BS)
    book.new_request("q", {"pdbench_role": "producer", "key": "k2"}, 70)
    assert book.plan([("q", [1, 2], 0, 24)]).saves == []  # first chunk: 24 of 70 tokens
    assert book.plan([], [("q", [3, 4], 24, 30)]).saves == []  # 54 of 70
    last = book.plan([], [("q", [9], 54, 16)]).saves  # 70 of 70: every block is filled
    assert [(t.key, t.block_ids, t.tokens) for t in last] == [("k2", [1, 2, 3, 4], 64)]
    book.new_request("r", {"pdbench_role": "producer", "key": "k3"}, 70)
    book.plan([("r", [1], 0, 10)])
    book.finished("r")  # aborted mid-prompt: nothing left behind
    assert book.plan([], [("r", [2], 10, 60)]).saves == []


def test_paged_roundtrip_through_the_object_store_is_exact(ray_local):
    g = torch.Generator().manual_seed(0)
    layers, num_blocks = 3, 12
    src = [torch.randn(num_blocks, 2, BS, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]
    dst = [torch.zeros_like(t) for t in src]
    directory = directory_actor("test-kv-blocks")
    cfg = KVTransferConfig(max_group_bytes=4096)
    sent = gather_blocks(src, [4, 1, 7], 0)
    stats = publish(directory, "r9/k", sent, 48, cfg)
    rec = receive(
        directory,
        "r9/k",
        BlockInjector(dst, [0, 10, 2], 0),
        cfg,
        run_id="",
        cell_id="",
        request_id="r9",
        kv_bytes_per_token=2 * 2 * 8 * layers,
    )
    assert rec.ok, rec.error
    assert rec.bytes == stats.bytes == 3 * BS * 2 * 8 * 2 * layers == rec.analytic_bytes
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(d[0], s[4]) and torch.equal(d[10], s[1]) and torch.equal(d[2], s[7])
        assert torch.count_nonzero(d[[1, 3, 4, 5, 6, 7, 8, 9, 11]].float()) == 0
    ray.kill(directory)


def test_injector_refuses_a_layer_that_does_not_fit():
    dst = [torch.zeros(4, 2, BS, 8)]
    inj = BlockInjector(dst, [0, 1], 0)
    with pytest.raises(ValueError, match="blocks need"):
        inj(0, torch.zeros(3, 2, BS, 8))
    with pytest.raises(ValueError, match="never received"):
        inj.finish()


def test_directory_hands_over_reports_once(ray_local):
    d = directory_actor("test-kv-reports")
    ray.get(d.report.remote("k", {"ok": True}))
    assert ray.get(d.take_report.remote("k", 1.0)) == {"ok": True}
    assert ray.get(d.take_report.remote("k", 0.1)) is None
    ray.kill(d)


def test_short_prompts_plan_no_save():
    book = TransferBook(BS)
    book.new_request("s", {"pdbench_role": "producer", "key": "ks"}, 10)
    assert book.plan([("s", [4], 0, 10)]).saves == []


def test_directory_status_tells_published_from_failed(ray_local):
    d = directory_actor("test-kv-status")
    cfg = KVTransferConfig(max_group_bytes=1024)
    publish(d, "ok", [torch.zeros(4, 64)], 4, cfg)
    st = ray.get(d.status.remote("ok"))
    assert st["failed"] is None and st["expected"] == st["registered"] >= 1
    ray.get(d.fail.remote("bad", "boom"))
    assert ray.get(d.status.remote("bad"))["failed"] == "boom"
    assert ray.get(d.status.remote("never"))["expected"] is None
    ray.kill(d)
