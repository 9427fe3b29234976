"""Layer-wise saves: the forward's progress (LayerProgress, on the engine's thread) and each saved
prompt's gather (SaveGather, on its sender's thread), with CPU tensors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.kv.blocks import Transfer, gather_blocks
from actors.kv.layerwise import LayerNotWritten, LayerProgress, SaveGather, layerwise_producer


def caches(layers: int = 4, dim: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (10, 2, 4, 8) if dim == 0 else (2, 10, 4, 8)
    return [torch.randn(*shape, generator=g) for _ in range(layers)]


@pytest.mark.parametrize("dim", [0, 1])
def test_each_save_gets_its_own_blocks_of_every_layer(dim):
    c = caches(dim=dim)
    saves = [Transfer("a/k", "a", [3, 1], 8), Transfer("b/k", "b", [7], 4)]
    progress = LayerProgress(c, dim, saves)
    for li in range(len(c)):
        progress.layer(li)
    for k, t in enumerate(saves):
        g = SaveGather(progress, k)
        g.ready(2, timeout_s=1)
        g.ready(len(c), timeout_s=1)
        assert all(torch.equal(x, y) for x, y in zip(g.layers, gather_blocks(c, t.block_ids, dim), strict=True))


def test_a_skipped_hook_counts_with_the_next_and_finish_marks_the_rest():
    c = caches()
    progress = LayerProgress(c, 0, [Transfer("a/k", "a", [2], 4)])
    g = SaveGather(progress, 0)
    progress.layer(1)  # layer 0's hook never ran
    assert g.ready(2, timeout_s=0.1) > 0
    progress.layer(0)  # late or repeated hooks change nothing
    c[3][2] += 1.0  # written by the pass before its end
    progress.finish()
    assert g.ready(4, timeout_s=0.1) > 0
    assert torch.equal(g.layers[3], c[3][[2]])


def test_a_sender_waits_for_the_layers_of_its_group_and_no_longer():
    progress = LayerProgress(caches(), 0, [Transfer("a/k", "a", [0], 4)])
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(SaveGather(progress, 0).ready(2, timeout_s=5)))
    waiter.start()
    progress.layer(0)
    time.sleep(0.05)
    assert not got  # layer 1 not written yet
    progress.layer(1)
    waiter.join(timeout=5)
    assert len(got) == 1


def test_the_step_loop_gathers_nothing_the_senders_do(monkeypatch):
    threads = []
    real = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: threads.append(threading.current_thread().name) or real(*a, **k))
    c = caches()
    progress = LayerProgress(c, 0, [Transfer("a/k", "a", [3, 1], 8), Transfer("b/k", "b", [7], 4)])
    for li in range(len(c)):
        progress.layer(li)  # the engine's thread: events and wake-ups only
    assert threads == []
    senders = [threading.Thread(target=lambda k=k: SaveGather(progress, k).ready(len(c), 1), name=f"sender-{k}") for k in (0, 1)]
    for s in senders:
        s.start()
    for s in senders:
        s.join()
    assert sorted(set(threads)) == ["sender-0", "sender-1"] and len(threads) == 2 * len(c)


def test_the_last_layer_gives_the_time_the_whole_kv_was_ready():
    progress = LayerProgress(caches(), 0, [Transfer("a/k", "a", [0], 4)])
    before = time.monotonic()
    progress.layer(1)
    progress.finish()
    _, done = progress.wait(4, timeout_s=1)
    assert before <= done <= time.monotonic()
    assert progress.wait(2, timeout_s=1)[1] <= done


def test_a_pass_that_never_writes_the_layer_fails_the_wait_by_name():
    progress = LayerProgress(caches(), 0, [Transfer("a/k", "a", [0], 4)])
    progress.layer(0)
    with pytest.raises(LayerNotWritten, match=r"layer 2 of the forward pass not written within 0\.05 s"):
        SaveGather(progress, 0).ready(3, timeout_s=0.05)


def test_only_a_layerwise_producer_asks_vllm_for_piecewise_graphs():
    assert layerwise_producer({"kv_transfer": {"save": "layerwise"}})
    assert not layerwise_producer({"kv_transfer": {"save": "layerwise"}, "receiver": True})  # decode keeps full graphs
    assert not layerwise_producer({"kv_transfer": {}})
    assert not layerwise_producer(None)
