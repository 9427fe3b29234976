"""Move one request's per-layer KV through the Ray object store and account for every stage.

Sender (`publish`), per layer group: extract (device→host into one pinned buffer on CUDA; a gather
of strided views on CPU), `ray.put` (one object per group, so a long context never sits in one
huge object and the receiver can fetch group i while group i+1 is still being put), register the
reference in the directory. Receiver (`receive`), per group: wait for the reference (wait_ref),
`ray.wait(fetch_local=True)` to make the bytes local (fetch, timed apart from deserialising),
`ray.get` (get; zero-copy for numpy on the same node), copy into the engine's memory (inject).

Tensors cross as numpy arrays; dtypes numpy lacks (bfloat16, float8) travel as a same-width
integer view and are viewed back on arrival, so the bytes are moved unchanged. Runs in plain
threads: `publish` and `receive` block, and callers run them off their event loop.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import ray
import torch

from actors.kv.accounting import SendStats, TransferRecord, observe_receive, observe_send
from actors.kv.spec import KVTransferConfig

_NUMPY_LESS = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NUMPY_LESS[getattr(torch, _name)] = torch.uint8
_ERROR_CHARS = 300


class KVUnavailable(RuntimeError):
    """The KV did not arrive: no reference in time, the sender failed, or the fetch timed out."""


@dataclass(frozen=True)
class GroupMeta:
    """What the receiver learns with a layer group's reference (the sender's side of the record)."""

    index: int
    groups: int
    first_layer: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    tokens: int
    bytes: int
    extract_s: float
    put_s: float
    src_node: str


class Injector(Protocol):
    """Puts a received layer where the engine wants it (its device memory, its block layout)."""

    def __call__(self, layer: int, host: torch.Tensor) -> None: ...

    def finish(self) -> None:
        """Wait for outstanding copies; raise if the KV is incomplete."""


class CopyInto:
    """Injector that copies layer i into `dsts[i]` (host→device where `dsts` live on a GPU)."""

    def __init__(self, dsts: Sequence[torch.Tensor]):
        self.dsts = list(dsts)
        self._seen: set[int] = set()

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        if not 0 <= layer < len(self.dsts):
            raise ValueError(f"layer {layer} received, but the destination has {len(self.dsts)} layers")
        dst = self.dsts[layer]
        if dst.shape != host.shape or dst.dtype != host.dtype:
            raise ValueError(
                f"layer {layer}: received {tuple(host.shape)} {host.dtype}, destination is {tuple(dst.shape)} {dst.dtype}"
            )
        dst.copy_(host)
        self._seen.add(layer)

    def finish(self) -> None:
        for device in {d.device for d in self.dsts if d.is_cuda}:
            torch.cuda.synchronize(device)
        missing = sorted(set(range(len(self.dsts))) - self._seen)
        if missing:
            raise ValueError(f"layers never received: {missing[:8]}{' …' if len(missing) > 8 else ''}")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(_NUMPY_LESS[t.dtype]) if t.dtype in _NUMPY_LESS else t).numpy()


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; they are only copied from
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    target = getattr(torch, dtype)
    return t if t.dtype == target else t.view(target)


def extract(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous host copies of `layers`. CUDA tensors go through one pinned buffer per call."""
    out: list[torch.Tensor | None] = [None] * len(layers)
    on_gpu = [i for i, t in enumerate(layers) if t.is_cuda]
    if on_gpu:
        sizes = [layers[i].numel() * layers[i].element_size() for i in on_gpu]
        staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        offset = 0
        for i, size in zip(on_gpu, sizes):
            t = layers[i]
            host = staging[offset : offset + size].view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=True)
            out[i] = host
            offset += size
        for device in {layers[i].device for i in on_gpu}:
            torch.cuda.synchronize(device)
    for i, t in enumerate(layers):
        if out[i] is None:
            out[i] = t.contiguous()
    return out  # type: ignore[return-value]


def publish(
    directory: Any,
    key: str,
    layers: Sequence[torch.Tensor],
    tokens: int,
    cfg: KVTransferConfig,
    *,
    run_id: str = "",
    cell_id: str = "",
) -> SendStats:
    """Put `layers` (one request's KV, one tensor per layer) into the object store under `key`.

    Every group's reference goes to the directory as soon as it exists; this process drops its own
    reference right after, so the object lives exactly as long as the directory or the receiver
    holds it (this process stays its owner: if it dies, the object is lost, and the receiver
    sees that).
    """
    n = len(layers)
    per = cfg.layers_per_group
    groups = max(1, math.ceil(n / per))
    src_node = ray.get_runtime_context().get_node_id()
    stats = SendStats(key=key, tokens=tokens, groups=groups, bytes=0, extract_s=0.0, put_s=0.0, src_node=src_node)
    acks = []
    for gi in range(groups):
        part = layers[gi * per : (gi + 1) * per]
        t0 = time.perf_counter()
        host = extract(part)
        arrays = [_to_numpy(h) for h in host]
        t1 = time.perf_counter()
        ref = ray.put(arrays)
        t2 = time.perf_counter()
        nbytes = int(sum(a.nbytes for a in arrays))
        meta = GroupMeta(
            index=gi,
            groups=groups,
            first_layer=gi * per,
            shapes=tuple(tuple(h.shape) for h in host),
            dtypes=tuple(_dtype_name(h.dtype) for h in host),
            tokens=tokens,
            bytes=nbytes,
            extract_s=t1 - t0,
            put_s=t2 - t1,
            src_node=src_node,
        )
        acks.append(directory.register.remote(key, gi, groups, meta, [ref]))
        stats.bytes += nbytes
        stats.extract_s += meta.extract_s
        stats.put_s += meta.put_s
        del ref, arrays, host
    ray.get(acks)  # a dead directory surfaces here, not as a silent hang on the receiver
    if run_id:
        observe_send(stats, run_id, cell_id)
    return stats


def reason_of(e: BaseException) -> str:
    """One line naming an exception, short enough for a parquet column."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:_ERROR_CHARS]


def receive(
    directory: Any,
    key: str,
    inject: Injector,
    cfg: KVTransferConfig,
    *,
    run_id: str,
    cell_id: str,
    request_id: str,
    kv_bytes_per_token: int | None = None,
) -> TransferRecord:
    """Fetch `key`'s layer groups in order and hand each layer to `inject`; never raises.

    On any failure (no reference in time, sender failed, object lost because its owner died or
    it was evicted, fetch timeout, a layer that does not fit) the record has ok=False and the
    reason; the key is dropped from the directory so nothing of it lingers, and the caller
    recomputes the prefill itself.
    """
    rec = TransferRecord(
        run_id=run_id, cell_id=cell_id, request_id=request_id, key=key, dst_node=ray.get_runtime_context().get_node_id()
    )
    spent: dict[str, float] = {}

    def add(stage: str, since: float) -> float:
        now = time.perf_counter()
        spent[stage] = spent.get(stage, 0.0) + (now - since)
        return now

    t_start = time.perf_counter()
    groups: int | None = None
    try:
        gi = 0
        while groups is None or gi < groups:
            t = time.perf_counter()
            entry = ray.get(directory.take.remote(key, gi, groups, cfg.ref_timeout_s))
            t = add("wait_ref_s", t)
            if "error" in entry:
                raise KVUnavailable(entry["error"])
            meta: GroupMeta = entry["meta"]
            refs = entry["refs"]
            del entry
            groups = meta.groups
            rec.tokens, rec.src_node = meta.tokens, meta.src_node
            spent["extract_s"] = spent.get("extract_s", 0.0) + meta.extract_s
            spent["put_s"] = spent.get("put_s", 0.0) + meta.put_s
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.fetch_timeout_s, fetch_local=True)
            t = add("fetch_s", t)
            if len(ready) < len(refs):
                raise KVUnavailable(f"fetch of layer group {gi} timed out after {cfg.fetch_timeout_s:g} s")
            arrays = ray.get(refs[0])
            t = add("get_s", t)
            for j, (a, dtype) in enumerate(zip(arrays, meta.dtypes)):
                inject(meta.first_layer + j, _from_numpy(a, dtype))
            add("inject_s", t)
            rec.bytes += meta.bytes
            rec.groups += 1
            del arrays, refs, ready
            gi += 1
        t = time.perf_counter()
        inject.finish()
        add("inject_s", t)
        rec.ok = True
    except Exception as e:  # every failure becomes a recorded reason and a recompute
        rec.error = reason_of(e)
        try:
            ray.get(directory.drop.remote(key), timeout=30)
        except Exception:  # a dead directory has nothing left to drop
            pass
    rec.total_s = time.perf_counter() - t_start
    for stage, v in spent.items():
        setattr(rec, stage, v)
    if "wait_ref_s" in spent:
        rec.stall_s = spent["wait_ref_s"] + spent.get("fetch_s", 0.0)
    if rec.tokens is not None and kv_bytes_per_token:
        rec.analytic_bytes = rec.tokens * kv_bytes_per_token
    observe_receive(rec)
    return rec
