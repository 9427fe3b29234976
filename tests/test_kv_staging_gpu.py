"""Pinned host→GPU staging on a real GPU (`pytest -m gpu`): received KV (pageable, read-only
object-store memory) must land bit-exact, in a contiguous tensor and in a paged cache's blocks,
and a GPU sender's overlapped device→host copies must publish exactly what the cache holds."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (run it with -m gpu on such a node)")
    return torch.device("cuda", 0)


def _readonly_host(nbytes: int, seed: int) -> torch.Tensor:
    arr = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    arr.setflags(write=False)  # as ray.get hands object-store memory out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def test_upload_crosses_chunks_and_both_buffers_exactly(cuda):
    from actors.kv.staging import HostToDevice

    h = HostToDevice(cuda, chunk_bytes=8 << 20, threads=4)  # 8 MiB chunks: the threaded copy runs
    srcs = [_readonly_host(n, i) for i, n in enumerate([(37 << 20) + 3, 1 << 20, 17])]
    h.begin()
    outs = [h.upload(s) for s in srcs]
    h.synchronize()
    for s, o in zip(srcs, outs, strict=True):
        assert o.device == cuda and torch.equal(o.cpu(), s)


def test_block_injector_fills_the_right_blocks_on_gpu(cuda):
    from actors.kv.blocks import BlockInjector, gather_blocks

    g = torch.Generator(device=cuda).manual_seed(0)
    caches = [torch.randn(64, 16, 4, 32, generator=g, device=cuda, dtype=torch.float32).to(torch.bfloat16) for _ in range(3)]
    src_blocks = [5, 9, 2, 40]
    layers = [t.cpu() for t in gather_blocks(caches, src_blocks, 0)]
    dst_caches = [torch.zeros_like(c) for c in caches]
    inj = BlockInjector(dst_caches, [1, 3, 60, 7], 0, threads=4)
    for i, t in enumerate(layers):
        inj(i, t)
    inj.finish()
    for c, d in zip(caches, dst_caches, strict=True):
        assert torch.equal(d[[1, 3, 60, 7]], c[src_blocks])
        assert d[0].abs().sum() == 0


def test_gpu_publish_overlaps_and_roundtrips_exactly(cuda, ray_local):
    import secrets

    import ray

    from actors.kv.directory import directory_actor
    from actors.kv.spec import KVTransferConfig
    from actors.kv.transport import CopyInto, publish, receive

    d = directory_actor(f"pdbench:test:{secrets.token_hex(3)}:kvdir")
    layers = [torch.randn(2, 8, 512, 128, device=cuda) for _ in range(6)]  # 4 MiB each
    cfg = KVTransferConfig(max_group_bytes=8 << 20)  # 3 groups: two staging buffers in turn
    sent = publish(d, "k/0", layers, tokens=512, cfg=cfg)
    dst = [torch.empty_like(t) for t in layers]
    rec = receive(d, "k/0", CopyInto(dst), cfg, run_id="t", cell_id="c", request_id="k")
    assert rec.ok, rec.error
    assert sent.groups == rec.groups == 3 and rec.send_s == pytest.approx(sent.send_s)
    assert all(torch.equal(a, b) for a, b in zip(layers, dst, strict=True))
    ray.kill(d)


def test_registered_object_store_dma_lands_exactly_and_checksums_hold(cuda, ray_local):
    """The receiver's fast path: the store's mapping registered with CUDA once, each group DMAed
    straight from its object into the blocks, every group's checksum compared."""
    import secrets

    import ray

    from actors.kv import plasma
    from actors.kv.blocks import BlockInjector, gather_blocks
    from actors.kv.directory import directory_actor
    from actors.kv.spec import KVTransferConfig
    from actors.kv.transport import publish, receive

    reg = plasma.registered()
    assert reg is not None, plasma.registration_error()
    d = directory_actor(f"pdbench:test:{secrets.token_hex(3)}:kvdir")
    g = torch.Generator(device=cuda).manual_seed(1)
    caches = [torch.randn(128, 2, 16, 8, 128, generator=g, device=cuda).to(torch.bfloat16) for _ in range(8)]
    src, dstb = [3, 77, 5, 100, 9], [60, 1, 2, 127, 40]
    cfg = KVTransferConfig(max_group_bytes=1 << 20)  # several groups
    publish(d, "reg/0", gather_blocks(caches, src, 0), tokens=80, cfg=cfg)
    dst = [torch.zeros_like(c) for c in caches]
    inj = BlockInjector(dst, dstb, 0, registration=reg)
    rec = receive(d, "reg/0", inj, cfg, run_id="t", cell_id="c", request_id="reg")
    assert rec.ok, rec.error
    for c, x in zip(caches, dst, strict=True):
        assert torch.equal(x[dstb], c[src])
    ray.kill(d)


def test_a_new_receive_buffer_is_no_block_an_engine_kernel_may_still_write(cuda):
    """A block freed while kernels on its stream still run is handed out again at once on that
    stream; NIXL's write is not ordered after those kernels, so a receive buffer comes from a
    stream of its own (actors/kv/rdt.py fresh_buffer), whose blocks none of them can touch."""
    from actors.kv.rdt import fresh_buffer

    nbytes = 3 << 20
    torch.cuda._sleep(200_000_000)  # ~0.1 s of a kernel queued on the current stream
    busy = torch.empty(nbytes, dtype=torch.uint8, device=cuda)
    busy.fill_(1)  # queued behind the sleep: still to write when the block is freed
    ptr = busy.data_ptr()
    del busy  # back to the current stream's pool while its write is pending
    assert torch.empty(nbytes, dtype=torch.uint8, device=cuda).data_ptr() == ptr  # the hazard: reused at once
    buf = fresh_buffer(cuda, nbytes)
    assert buf.data_ptr() != ptr and buf.numel() == nbytes
    torch.cuda.synchronize()
