"""LayerwiseGather: a producer's blocks gathered layer by layer as a forward pass writes them."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.kv.blocks import Transfer, gather_blocks
from actors.kv.layerwise import LayerNotWritten, LayerwiseGather, layerwise_producer


def caches(layers: int = 4, dim: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (10, 2, 4, 8) if dim == 0 else (2, 10, 4, 8)
    return [torch.randn(*shape, generator=g) for _ in range(layers)]


@pytest.mark.parametrize("dim", [0, 1])
def test_each_save_gets_its_own_blocks_of_every_layer(dim):
    c = caches(dim=dim)
    saves = [Transfer("a/k", "a", [3, 1], 8), Transfer("b/k", "b", [7], 4)]
    lg = LayerwiseGather(c, dim, saves)
    for li in range(len(c)):
        lg.layer(li)
    for k, t in enumerate(saves):
        assert all(torch.equal(x, y) for x, y in zip(lg.outputs[k], gather_blocks(c, t.block_ids, dim), strict=True))


def test_a_skipped_hook_is_gathered_with_the_next_and_finish_gathers_the_rest():
    c = caches()
    lg = LayerwiseGather(c, 0, [Transfer("a/k", "a", [2], 4)])
    lg.layer(1)  # layer 0's hook never ran
    assert lg.wait(2, timeout_s=0.1) > 0
    lg.layer(0)  # late or repeated hooks change nothing
    c[3][2] += 1.0  # written by the pass before its end
    lg.finish()
    assert lg.wait(4, timeout_s=0.1) > 0
    assert torch.equal(lg.outputs[0][3], c[3][[2]])


def test_a_sender_waits_for_the_layers_of_its_group_and_no_longer():
    c = caches()
    lg = LayerwiseGather(c, 0, [Transfer("a/k", "a", [0], 4)])
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(lg.wait(2, timeout_s=5)))
    waiter.start()
    lg.layer(0)
    time.sleep(0.05)
    assert not got  # layer 1 not written yet
    lg.layer(1)
    waiter.join(timeout=5)
    assert len(got) == 1


def test_a_pass_that_never_writes_the_layer_fails_the_wait_by_name():
    lg = LayerwiseGather(caches(), 0, [Transfer("a/k", "a", [0], 4)])
    lg.layer(0)
    with pytest.raises(LayerNotWritten, match=r"layer 2 of the forward pass not written within 0\.05 s"):
        lg.wait(3, timeout_s=0.05)


def test_only_a_layerwise_producer_asks_vllm_for_piecewise_graphs():
    assert layerwise_producer({"kv_transfer": {"save": "layerwise"}})
    assert not layerwise_producer({"kv_transfer": {"save": "layerwise"}, "receiver": True})  # decode keeps full graphs
    assert not layerwise_producer({"kv_transfer": {}})
    assert not layerwise_producer(None)


def test_one_gather_per_layer_serves_every_save_when_blocks_are_on_dim_0(monkeypatch):
    calls = []
    real = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = caches()
    saves = [Transfer("a/k", "a", [3, 1], 8), Transfer("b/k", "b", [7], 4), Transfer("c/k", "c", [0, 9], 8)]
    lg = LayerwiseGather(c, 0, saves)
    lg.finish()
    assert len(calls) == len(c)  # not one per save and layer: the engine's thread pays per layer
    for k, t in enumerate(saves):
        assert all(torch.equal(x, y) for x, y in zip(lg.outputs[k], gather_blocks(c, t.block_ids, 0), strict=True))


def test_the_last_layer_gives_the_time_the_whole_kv_was_ready():
    lg = LayerwiseGather(caches(), 0, [Transfer("a/k", "a", [0], 4)])
    before = time.monotonic()
    lg.layer(1)
    lg.finish()
    done = lg.wait(4, timeout_s=1)
    assert before <= done <= time.monotonic()
    assert lg.wait(2, timeout_s=1) <= done
