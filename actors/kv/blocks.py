"""Paged-KV bookkeeping for the vLLM connector, kept free of vLLM so it is tested on any machine.

`TransferBook` makes the scheduler-side decisions (which request loads or saves which blocks);
`gather_blocks` and `BlockInjector` move whole blocks between a paged KV cache and the transport.
vLLM 0.26 lays each layer's cache out with the block index on dim 0 (FlashAttention:
(num_blocks, ...)); a layout with K/V first, (2, num_blocks, ...), puts it on dim 1: `block_dim`
finds which from the cache's shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.kv.staging import host_to_device
from actors.kv.transport import Injector

PRODUCER, CONSUMER = "producer", "consumer"


def transferable_tokens(prompt_len: int, block_size: int) -> int:
    """Tokens whose KV crosses: whole blocks only, never the last prompt token (the decode engine
    computes it, and that step yields its first output token)."""
    return max(0, (prompt_len - 1) // block_size) * block_size


def block_dim(shape: Sequence[int], num_blocks: int | None) -> int:
    if num_blocks is not None and shape[0] != num_blocks and len(shape) > 1 and shape[1] == num_blocks:
        return 1
    return 0


@dataclass
class Transfer:
    key: str
    request_id: str
    block_ids: list[int]
    tokens: int


@dataclass
class StepPlan:
    """What the worker does around one forward pass (vLLM pickles it to the worker).

    `cancels`: consumers whose request ended while their load may still run (abort mid-load): the
    worker stops the load and still reports it finished, once. `drops`: transfer keys of consumers
    that ended before any load started, so what the producer published is freed now rather than
    when the directory's time-to-live runs out."""

    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)


class TransferBook:
    """Scheduler-side state: one per engine, fed by vLLM's scheduler hooks.

    A producer's prompt may be computed over several steps (chunked prefill shares each step's
    token budget between requests): its block ids are collected step by step, and the save is
    planned for the step that computes the prompt's last token, when every block holds its KV. A
    preempted producer that resumes gets a new block list (vLLM's `resumed_req_ids`: its new block
    ids replace the old ones), and its KV is recomputed into them.

    Loads and saves run asynchronously in the worker: a consumer waits in vLLM's
    WAITING_FOR_REMOTE_KVS until the worker reports its load finished, and a producer whose save
    was planned keeps its blocks after it finishes (`finished` returns True) until the worker
    reports the save finished. The book remembers both until vLLM says so (`worker_finished`).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._producers: dict[str, tuple[str, int]] = {}
        self._blocks: dict[str, list[int]] = {}  # producer blocks seen so far
        self._pending_loads: dict[str, Transfer] = {}
        self._loaded: set[str] = set()  # allocated once: after a preemption the prompt is recomputed
        self._consumers: dict[str, str] = {}  # consumer request id -> key
        self._loading: set[str] = set()  # load planned, not yet reported finished by the worker
        self._saving: set[str] = set()  # save planned, not yet reported finished by the worker
        self._cancels: list[str] = []
        self._drops: list[str] = []

    def new_request(self, request_id: str, params: dict[str, Any], prompt_len: int) -> None:
        if params.get("pdbench_role") == PRODUCER:
            self._producers[request_id] = (params["key"], prompt_len)
        elif params.get("pdbench_role") == CONSUMER:
            self._consumers[request_id] = params["key"]

    def matched_tokens(self, request_id: str, params: dict[str, Any], prompt_len: int, num_computed: int) -> int:
        """External tokens a consumer can load; no side effects (vLLM may ask repeatedly)."""
        if params.get("pdbench_role") != CONSUMER or request_id in self._loaded:
            return 0
        return max(0, transferable_tokens(prompt_len, self.block_size) - num_computed)

    def allocated(self, request_id: str, params: dict[str, Any], prompt_len: int, block_ids: list[int], num_external: int) -> None:
        if num_external <= 0:
            return  # vLLM calls again with 0 when the request resumes after its load
        n = transferable_tokens(prompt_len, self.block_size) // self.block_size
        self._pending_loads[request_id] = Transfer(params["key"], request_id, list(block_ids[:n]), n * self.block_size)
        self._loaded.add(request_id)

    def plan(
        self,
        scheduled_new: list[tuple[str, list[int], int, int]],
        scheduled_cached: Sequence[tuple[str, list[int] | None, int, int]] = (),
        resumed: set[str] | frozenset[str] = frozenset(),
    ) -> StepPlan:
        """Each scheduled request as (id, block ids new this step, tokens computed before, tokens
        scheduled now); for a new request its block ids are all it has so far; for a request in
        `resumed` (back from preemption) its block ids this step are all it has."""
        plan = StepPlan(loads=list(self._pending_loads.values()), cancels=self._cancels, drops=self._drops)
        self._loading.update(self._pending_loads)
        self._pending_loads.clear()
        self._cancels, self._drops = [], []
        for rid, blocks, computed, scheduled in [*scheduled_new, *scheduled_cached]:
            if rid not in self._producers:
                continue
            if rid in resumed:
                self._blocks[rid] = list(blocks or [])
            else:
                self._blocks.setdefault(rid, []).extend(blocks or [])
            key, prompt_len = self._producers[rid]
            if computed + scheduled < prompt_len:
                continue  # a chunk: the rest of the prompt comes in a later step
            del self._producers[rid]
            tokens = transferable_tokens(prompt_len, self.block_size)
            blocks_all = self._blocks.pop(rid)
            if tokens:  # a prompt shorter than a block + 1 has nothing to move
                plan.saves.append(Transfer(key, rid, blocks_all[: tokens // self.block_size], tokens))
                self._saving.add(rid)
        return plan

    def finished(self, request_id: str) -> bool:
        """vLLM ended the request; True = keep its blocks until the worker reports its save done."""
        self._producers.pop(request_id, None)
        self._blocks.pop(request_id, None)
        key = self._consumers.pop(request_id, None)
        if request_id in self._pending_loads or request_id in self._loading:  # planned this step, not yet handed to the worker
            self._cancels.append(request_id)
        elif key is not None and request_id not in self._loaded:
            self._drops.append(key)  # never loaded: free what the producer published
        self._loaded.discard(request_id)
        return request_id in self._saving

    def worker_finished(self, sending: Iterable[str] = (), recving: Iterable[str] = ()) -> None:
        """The worker's report (vLLM's KVConnectorOutput) reached the scheduler."""
        self._saving.difference_update(sending)
        self._loading.difference_update(recving)

    def open(self) -> dict[str, int]:
        """What the book still waits for (a test's leak check)."""
        return {"saving": len(self._saving), "loading": len(self._loading), "producers": len(self._producers)}


def gather_blocks(caches: Sequence[torch.Tensor], block_ids: list[int], dim: int) -> list[torch.Tensor]:
    """One request's blocks from every layer, as new tensors (the cache may be reused at once)."""
    idx = torch.tensor(block_ids, device=caches[0].device, dtype=torch.long)
    return [kv.index_select(dim, idx) for kv in caches]


class BlockInjector(Injector):
    """Transport injector into a paged cache at `block_ids`.

    On a GPU every copy runs on the injector's own stream, ordered after `after` (an event the
    engine's thread recorded on its stream: this object may live in another thread, whose current
    stream orders nothing the engine queued). A layer group whose bytes lie in the registered
    object store (actors/kv/plasma.py) goes to the GPU in one DMA straight from the object, then
    into the blocks layer by layer; other groups go through pinned staging. The objects stay
    referenced until their copies are done. `finish` waits for all of it, before vLLM may schedule
    a forward pass that reads the blocks."""

    def __init__(
        self,
        caches: Sequence[torch.Tensor],
        block_ids: list[int],
        dim: int,
        threads: int = 4,
        *,
        after: Any = None,
        registration: Any = None,
    ):
        super().__init__()
        self.caches = list(caches)
        self.layers = len(self.caches)
        self.dim = dim
        device = self.caches[0].device
        self.device = device
        self.stream = None
        self.h2d = None
        self.registration = registration
        self._held: list[tuple[Any, torch.Tensor]] = []  # (event, object bytes) until the DMA is done
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            if after is not None:
                self.stream.wait_event(after)
            else:
                self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                self.idx = torch.tensor(block_ids, dtype=torch.long).to(device)
            self.h2d = host_to_device(device, threads)
            self.h2d.begin(after)
        else:
            self.idx = torch.tensor(block_ids, dtype=torch.long)

    def _check(self, layer: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if not 0 <= layer < len(self.caches):
            raise ValueError(f"layer {layer} received, but the cache has {len(self.caches)} layers")
        dst = self.caches[layer]
        want = list(dst.shape)
        want[self.dim] = len(self.idx)
        if list(shape) != want or dtype != dst.dtype:
            raise ValueError(f"layer {layer}: received {tuple(shape)} {dtype}, blocks need {tuple(want)} {dst.dtype}")
        return dst

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        dst = self._check(layer, host.shape, host.dtype)
        if self.stream is None:
            dst.index_copy_(self.dim, self.idx, host)
        else:
            assert self.h2d is not None
            staged = self.h2d.upload(host)
            self.stream.wait_stream(self.h2d.stream)
            staged.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                dst.index_copy_(self.dim, self.idx, staged)
        self._seen.add(layer)

    def group(self, flat: torch.Tensor, meta: Any) -> None:
        reg = self.registration
        on_device = flat.is_cuda  # a tensor transport (NIXL) read it onto this GPU already
        if self.stream is None or not (on_device or (reg is not None and reg.covers(flat.data_ptr(), flat.numel()))):
            super().group(flat, meta)
            return
        from actors.kv.transport import unpack

        layers = enumerate(zip(meta.shapes, meta.dtypes, strict=True))
        dsts = [self._check(meta.first_layer + j, shape, getattr(torch, dt)) for j, (shape, dt) in layers]
        with torch.cuda.stream(self.stream):
            dev = flat
            if not on_device:
                dev = torch.empty(flat.numel(), dtype=torch.uint8, device=self.idx.device)
                dev.copy_(flat, non_blocking=True)  # a DMA: the store's pages are registered
            for dst, layer in zip(dsts, unpack(dev, meta), strict=True):
                dst.index_copy_(self.dim, self.idx, layer)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._held = [(e, f) for e, f in self._held if not e.query()]
        self._held.append((done, flat))
        if not on_device:
            self.direct += 1
        self._seen.update(range(meta.first_layer, meta.first_layer + len(meta.shapes)))
        self._expect(meta)

    def _expect(self, meta: Any, landed_now: bool = True) -> None:
        # Queued on the injector's stream, after the group's copies: the sum runs on the GPU while
        # later groups arrive; `finish` only reads the values.
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            super()._expect(meta, landed_now=True)

    def landed(self, layer: int) -> torch.Tensor:
        return self.caches[layer].index_select(self.dim, self.idx)

    def finish(self) -> None:
        if self.stream is None:
            super().finish()
            return
        with torch.cuda.stream(self.stream):  # the checksums read the blocks on this stream
            super().finish()

    def fence(self) -> Any:
        if self.stream is None:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)  # after the group copies and checksums queued on it
        return done

    def settle(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        if self.h2d is not None:
            self.h2d.synchronize()
        self._held.clear()
