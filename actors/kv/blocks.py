"""Paged-KV bookkeeping for the vLLM connector, kept free of vLLM so it is tested on any machine.

`TransferBook` makes the scheduler-side decisions (which request loads or saves which blocks);
`gather_blocks` and `BlockInjector` move whole blocks between a paged KV cache and the transport.
vLLM 0.26 lays each layer's cache out with the block index on dim 0 (FlashAttention:
(num_blocks, ...)); a layout with K/V first, (2, num_blocks, ...), puts it on dim 1: `block_dim`
finds which from the cache's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from actors.kv.staging import host_to_device

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
    """What the worker does around one forward pass (vLLM pickles it to the worker)."""

    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)


class TransferBook:
    """Scheduler-side state: one per engine, fed by vLLM's scheduler hooks.

    A producer's prompt may be computed over several steps (chunked prefill shares each step's
    token budget between requests): its block ids are collected step by step, and the save is
    planned for the step that computes the prompt's last token, when every block holds its KV.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._producers: dict[str, tuple[str, int]] = {}
        self._blocks: dict[str, list[int]] = {}  # producer blocks seen so far
        self._pending_loads: dict[str, Transfer] = {}
        self._loaded: set[str] = set()  # allocated once: after a preemption the prompt is recomputed

    def new_request(self, request_id: str, params: dict[str, Any], prompt_len: int) -> None:
        if params.get("pdbench_role") == PRODUCER:
            self._producers[request_id] = (params["key"], prompt_len)

    def matched_tokens(self, request_id: str, params: dict[str, Any], prompt_len: int, num_computed: int) -> int:
        """External tokens a consumer can load; no side effects (vLLM may ask repeatedly)."""
        if params.get("pdbench_role") != CONSUMER or request_id in self._loaded:
            return 0
        return max(0, transferable_tokens(prompt_len, self.block_size) - num_computed)

    def allocated(self, request_id: str, params: dict[str, Any], prompt_len: int, block_ids: list[int], num_external: int) -> None:
        if num_external <= 0:
            return
        n = transferable_tokens(prompt_len, self.block_size) // self.block_size
        self._pending_loads[request_id] = Transfer(params["key"], request_id, list(block_ids[:n]), n * self.block_size)
        self._loaded.add(request_id)

    def plan(
        self,
        scheduled_new: list[tuple[str, list[int], int, int]],
        scheduled_cached: list[tuple[str, list[int] | None, int, int]] = (),
    ) -> StepPlan:
        """Each scheduled request as (id, block ids new this step, tokens computed before, tokens
        scheduled now); for a new request its block ids are all it has so far."""
        plan = StepPlan(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        for rid, blocks, computed, scheduled in [*scheduled_new, *scheduled_cached]:
            if rid not in self._producers:
                continue
            self._blocks.setdefault(rid, []).extend(blocks or [])
            key, prompt_len = self._producers[rid]
            if computed + scheduled < prompt_len:
                continue  # a chunk: the rest of the prompt comes in a later step
            del self._producers[rid]
            tokens = transferable_tokens(prompt_len, self.block_size)
            blocks_all = self._blocks.pop(rid)
            if tokens:  # a prompt shorter than a block + 1 has nothing to move
                plan.saves.append(Transfer(key, rid, blocks_all[: tokens // self.block_size], tokens))
        return plan

    def finished(self, request_id: str) -> None:
        self._producers.pop(request_id, None)
        self._blocks.pop(request_id, None)
        self._pending_loads.pop(request_id, None)
        self._loaded.discard(request_id)


def gather_blocks(caches: Sequence[torch.Tensor], block_ids: list[int], dim: int) -> list[torch.Tensor]:
    """One request's blocks from every layer, as new tensors (the cache may be reused at once)."""
    idx = torch.tensor(block_ids, device=caches[0].device, dtype=torch.long)
    return [kv.index_select(dim, idx) for kv in caches]


class BlockInjector:
    """Transport injector: copies each received layer into the paged cache at `block_ids`; into a
    GPU cache through pinned staging (actors/kv/staging.py) on a side stream, waited for in
    `finish`, before the forward pass reads the blocks."""

    def __init__(self, caches: Sequence[torch.Tensor], block_ids: list[int], dim: int, threads: int = 4):
        self.caches = list(caches)
        self.dim = dim
        device = self.caches[0].device
        self.idx = torch.tensor(block_ids, dtype=torch.long).to(device)
        self.h2d = host_to_device(device, threads) if device.type == "cuda" else None
        if self.h2d is not None:
            self.h2d.begin()  # after the engine's queued work and the index copy above
        self._seen: set[int] = set()

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        if not 0 <= layer < len(self.caches):
            raise ValueError(f"layer {layer} received, but the cache has {len(self.caches)} layers")
        dst = self.caches[layer]
        want = list(dst.shape)
        want[self.dim] = len(self.idx)
        if list(host.shape) != want or host.dtype != dst.dtype:
            raise ValueError(f"layer {layer}: received {tuple(host.shape)} {host.dtype}, blocks need {tuple(want)} {dst.dtype}")
        if self.h2d is None:
            dst.index_copy_(self.dim, self.idx, host)
        else:
            staged = self.h2d.upload(host)
            with torch.cuda.stream(self.h2d.stream):
                dst.index_copy_(self.dim, self.idx, staged)
        self._seen.add(layer)

    def settle(self) -> None:
        if self.h2d is not None:
            self.h2d.synchronize()

    def finish(self) -> None:
        self.settle()
        missing = sorted(set(range(len(self.caches))) - self._seen)
        if missing:
            raise ValueError(f"layers never received: {missing[:8]}")
