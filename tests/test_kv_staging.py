"""Host staging for the KV transport (actors/kv/staging.py): the parts that run on any machine."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from actors.kv.staging import Staging, byte_view, parallel_copy


@pytest.mark.parametrize("n,parts", [(5 << 20, 4), ((3 << 20) + 7, 3), (1000, 4), (4 << 20, 1)])
def test_parallel_copy_moves_every_byte(n, parts):
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    dst = torch.zeros(n, dtype=torch.uint8)
    with ThreadPoolExecutor(4) as pool:
        parallel_copy(dst, src, pool, parts)
    assert torch.equal(dst, src)


def test_parallel_copy_refuses_a_size_mismatch():
    with pytest.raises(ValueError, match="copy of 10 bytes into 9"):
        parallel_copy(torch.empty(9, dtype=torch.uint8), torch.empty(10, dtype=torch.uint8), None, 1)


def test_byte_view_shares_memory():
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    b = byte_view(t)
    assert b.numel() == 12 and b.dtype == torch.uint8
    b.fill_(0xFF)
    assert torch.isnan(t).all()


def test_staging_reuses_two_buffers_per_kind():
    s = Staging()
    a, b = s.take(100, False), s.take(100, False)
    assert a.data_ptr() != b.data_ptr()  # a sender that overlaps holds two at once
    s.give(a, False)
    s.give(b, False)
    s.give(torch.empty(10, dtype=torch.uint8), False)  # smaller than both kept: dropped
    got = {s.take(50, False).data_ptr(), s.take(50, False).data_ptr()}
    assert got == {a.data_ptr(), b.data_ptr()}
    assert s.take(200, False).numel() == 200  # none large enough: a new one


def test_staging_of_another_kind_allocates_through_its_hook_and_releases_what_it_does_not_keep():
    made, dropped = [], []

    def allocate(nbytes: int, pinned: bool) -> torch.Tensor:
        made.append(nbytes)
        return torch.zeros(nbytes, dtype=torch.uint8)

    pool = Staging(allocate, dropped.append)
    bufs = [pool.take(16 + i, False) for i in range(Staging.KEPT + 2)]
    assert made == [16 + i for i in range(Staging.KEPT + 2)]
    for b in bufs:
        pool.give(b, False)
    # The largest KEPT stay for reuse; the two smallest go back through `drop`.
    assert sorted(b.numel() for b in dropped) == [16, 17]
    assert pool.take(20, False).numel() >= 20 and len(made) == Staging.KEPT + 2
