"""Move one request's per-layer KV through the Ray object store and account for every stage.

Sender (`publish`), per layer group (consecutive layers up to `max_group_bytes`): extract (pack the
group's layers into one contiguous host buffer: device→host into pinned memory on CUDA, where
group i+1's copy runs while group i is put; a gather of the strided views on CPU), `ray.put` (one
object per group, so a long context never sits in one huge object and the receiver can fetch
group i while group i+1 is still being put), register the reference in the directory. Receiver
(`receive`): wait for references (wait_ref; one directory call hands over every group already
registered), then per group `ray.wait(fetch_local=True)` to make the bytes local (fetch, timed
apart from deserialising), `ray.get` (get; zero-copy on the same node), copy each layer into the
engine's memory (inject; into a GPU through pinned staging, actors/kv/staging.py).

A group travels as one flat uint8 array plus the layers' offsets, shapes and dtypes: the bytes move
unchanged whatever the dtype (bfloat16 and float8, which numpy lacks, included), and Ray serialises
one buffer per object (each extra out-of-band buffer costs about a millisecond: on a 2-core box one
put of 36 arrays of 1.8 MiB took ten times as long as one put of a 64 MiB array).
`publish` and `receive` block; callers run them off their event loop.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from actors.kv.accounting import SendStats, TransferRecord, observe_receive, observe_send
from actors.kv.spec import KVTransferConfig
from actors.kv.staging import STAGING, host_to_device

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
    offsets: tuple[int, ...]  # byte offset of each layer in the group's buffer
    tokens: int
    bytes: int
    extract_s: float
    put_s: float
    send_s: float  # from the start of publish to this group's put: the last group's is the sender's wall
    src_node: str
    checksum: int | None = None  # kv_checksum of the group's layers on the sender (None: not computed)
    ready_ts: float | None = None  # sender's CLOCK_MONOTONIC when the KV was ready (host-wide on Linux)


_CHECKSUM_CHUNK = 1 << 22  # int32 words per step: bounds the int64 temporaries (32 MiB each)
_WEIGHTS: dict[Any, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(_CHECKSUM_CHUNK, dtype=torch.int64, device=device) % 65521 + 1
    return _WEIGHTS[device]


def kv_checksum(layers: Sequence[torch.Tensor]) -> int:
    """A position-weighted sum of the layers' bytes (as int32 words), computed where they live.

    Why: with random weights the token oracle cannot tell right KV from wrong KV, so the bytes are
    checked directly: the sender sums what it gathered, the receiver sums what landed in its
    blocks. Weighting by position within a chunk, by chunk and by layer catches blocks or layers
    that arrive swapped, not only bytes that changed. int64 sums wrap identically on every device,
    so CPU and GPU agree; the device is waited for once per call."""
    if not layers:
        return 0
    device = layers[0].device
    weights = _weights(device)
    acc = torch.zeros((), dtype=torch.int64, device=device)
    for li, t in enumerate(layers):
        w = t.contiguous().reshape(-1).view(torch.uint8)
        if w.numel() % 4 == 0:
            w = w.view(torch.int32)
        for ci, a in enumerate(range(0, w.numel(), _CHECKSUM_CHUNK)):
            part = w[a : a + _CHECKSUM_CHUNK].to(torch.int64)
            acc += (part * weights[: part.numel()]).sum() * ((li + 1) * 1_000_003 + ci + 1)
    return int(acc) & ((1 << 63) - 1)


class Injector:
    """Puts received layers where the engine wants them (its device memory, its block layout).

    `group` takes one layer group's packed bytes; the default unpacks them and hands each layer to
    `__call__`. `finish` waits for outstanding copies, raises if a layer is missing, and compares
    each group's checksum (when the sender sent one) with the bytes that `landed` holds."""

    layers: int
    direct = 0  # groups copied straight from registered object-store memory (BlockInjector on a GPU)

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._sums: list[tuple[int, int, int]] = []  # (first layer, layer count, sender's checksum)

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        raise NotImplementedError

    def landed(self, layer: int) -> torch.Tensor:
        """The received bytes of `layer`, shaped as sent (what the checksum is taken over)."""
        raise NotImplementedError

    def group(self, flat: torch.Tensor, meta: GroupMeta) -> None:
        for j, layer in enumerate(unpack(flat, meta)):
            self(meta.first_layer + j, layer)
        self._expect(meta)

    def _expect(self, meta: GroupMeta) -> None:
        if meta.checksum is not None:
            self._sums.append((meta.first_layer, len(meta.shapes), meta.checksum))

    def settle(self) -> None:
        """Wait for outstanding copies (a receive that failed halfway: nothing may still be writing
        into memory its owner frees next)."""

    def finish(self) -> None:
        self.settle()
        missing = sorted(set(range(self.layers)) - self._seen)
        if missing:
            raise ValueError(f"layers never received: {missing[:8]}{' …' if len(missing) > 8 else ''}")
        for first, n, want in self._sums:
            got = kv_checksum([self.landed(first + j) for j in range(n)])
            if got != want:
                raise ValueError(f"KV checksum mismatch in layers {first}..{first + n - 1}: the blocks hold other bytes than were sent")


def _copy_streams(devices: Iterable[torch.device]) -> dict[torch.device, Any]:
    """A side stream per GPU for the transport's copies, ordered after the work already queued on
    the current stream (which wrote the KV). Waiting on it alone, not on the whole device, keeps
    the engine's next steps out of the copy's time."""
    streams = {}
    for d in {d for d in devices if d.type == "cuda"}:
        streams[d] = torch.cuda.Stream(d)
        streams[d].wait_stream(torch.cuda.current_stream(d))
    return streams


class CopyInto(Injector):
    """Injector that copies layer i into `dsts[i]`; into a GPU through pinned staging
    (actors/kv/staging.py), since the received bytes sit in pageable object-store memory."""

    def __init__(self, dsts: Sequence[torch.Tensor], threads: int = 4):
        super().__init__()
        self.dsts = list(dsts)
        self.layers = len(self.dsts)
        gpus = {d.device for d in self.dsts if d.is_cuda}
        self._h2d = {dev: host_to_device(dev, threads) for dev in gpus}
        for h in self._h2d.values():
            h.begin()

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        if not 0 <= layer < len(self.dsts):
            raise ValueError(f"layer {layer} received, but the destination has {len(self.dsts)} layers")
        dst = self.dsts[layer]
        if dst.shape != host.shape or dst.dtype != host.dtype:
            raise ValueError(f"layer {layer}: received {tuple(host.shape)} {host.dtype}, destination is {tuple(dst.shape)} {dst.dtype}")
        if dst.is_cuda:
            h2d = self._h2d[dst.device]
            staged = h2d.upload(host)
            with torch.cuda.stream(h2d.stream):
                dst.copy_(staged)
        else:
            dst.copy_(host)
        self._seen.add(layer)

    def landed(self, layer: int) -> torch.Tensor:
        return self.dsts[layer]

    def settle(self) -> None:
        for h in self._h2d.values():
            h.synchronize()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def layout(layers: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """Each layer's byte offset in a packed buffer (aligned to its element size, so every slice
    views back to its dtype) and the buffer's size."""
    offsets, total = [], 0
    for t in layers:
        total += -total % t.element_size()
        offsets.append(total)
        total += _nbytes(t)
    return tuple(offsets), total


def _pack_start(layers: Sequence[torch.Tensor], out: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], list[Any]]:
    """Queue the copy of `layers` into `out`'s first bytes: device→host copies run on side streams
    (returned, to wait on), host layers are copied at once."""
    offsets, total = layout(layers)
    buf = out[:total]
    streams = _copy_streams(t.device for t in layers)
    for t, off in zip(layers, offsets, strict=True):
        dst = buf[off : off + _nbytes(t)].view(t.dtype).view(t.shape)
        if t.is_cuda:
            with torch.cuda.stream(streams[t.device]):
                dst.copy_(t, non_blocking=True)
        else:
            dst.copy_(t)
    return buf, offsets, list(streams.values())


def pack(layers: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Copy `layers` into one contiguous host uint8 buffer (`out`'s first bytes if given, else a new
    one, pinned when a layer is on a GPU); return the packed bytes and each layer's offset."""
    if out is None:
        out = torch.empty(layout(layers)[1], dtype=torch.uint8, pin_memory=any(t.is_cuda for t in layers))
    buf, offsets, streams = _pack_start(layers, out)
    for stream in streams:
        stream.synchronize()
    return buf, offsets


def as_bytes(buf: np.ndarray) -> torch.Tensor:
    """An object-store buffer as a flat uint8 tensor over the same (read-only) memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only numpy memory
        return torch.from_numpy(buf)


def unpack(flat: torch.Tensor, meta: GroupMeta) -> list[torch.Tensor]:
    """The group's layers as views of `flat` (object-store memory is read-only: copy, never write)."""
    out = []
    for shape, dtype, off in zip(meta.shapes, meta.dtypes, meta.offsets, strict=True):
        dt = getattr(torch, dtype)
        n = math.prod(shape) * dt.itemsize
        out.append(flat[off : off + n].view(dt).view(shape))
    return out


def layer_groups(layers: Sequence[torch.Tensor], max_group_bytes: int) -> list[tuple[int, int]]:
    """Consecutive layers, as [first, end) spans, each at most `max_group_bytes` (a layer larger
    than that travels alone): a short context is one object, a long one many, fetched one by one
    while the next is still being put."""
    spans: list[tuple[int, int]] = []
    first, size = 0, 0
    for i, t in enumerate(layers):
        if i > first and size + _nbytes(t) > max_group_bytes:
            spans.append((first, i))
            first, size = i, 0
        size += _nbytes(t)
    spans.append((first, len(layers)))
    return spans


def publish(
    directory: Any,
    key: str,
    layers: Sequence[torch.Tensor],
    tokens: int,
    cfg: KVTransferConfig,
    *,
    run_id: str = "",
    cell_id: str = "",
    ready_ts: float | None = None,
) -> SendStats:
    """Put `layers` (one request's KV, one tensor per layer) into the object store under `key`.

    Every group's reference goes to the directory as soon as it exists; this process drops its own
    reference right after, so the object lives exactly as long as the directory or the receiver
    holds it (this process stays its owner: if it dies, the object is lost, and the receiver
    sees that). `ready_ts` (CLOCK_MONOTONIC) is when the KV was complete on the sender; it travels
    with every group so a receiver on the same host can time KV ready → KV injected.
    """
    spans = layer_groups(layers, cfg.max_group_bytes)
    groups = len(spans)
    src_node = ray.get_runtime_context().get_node_id()
    stats = SendStats(key=key, tokens=tokens, groups=groups, bytes=0, extract_s=0.0, put_s=0.0, send_s=0.0, src_node=src_node)
    acks = []
    pinned = any(t.is_cuda for t in layers)
    # From a GPU, group i+1's device→host copy runs on the copy engine while group i is put, in a
    # second staging buffer; host layers are packed one group at a time into one buffer.
    overlap = pinned and groups > 1
    t_start = time.perf_counter()
    size = max(layout(layers[a:b])[1] for a, b in spans)
    staging = [STAGING.take(size, pinned) for _ in range(2 if overlap else 1)]

    def start(gi: int) -> tuple[torch.Tensor, tuple[int, ...], list[Any]]:
        a, b = spans[gi]
        return _pack_start(layers[a:b], staging[gi % len(staging)])

    pending = start(0)
    issued_s = time.perf_counter() - t_start  # staging and queueing: part of the first extract
    try:
        for gi, (first, end) in enumerate(spans):
            part = layers[first:end]
            checksum = kv_checksum(part) if cfg.checksum else None
            t0 = time.perf_counter()
            buf, offsets, streams = pending
            for stream in streams:
                stream.synchronize()
            extract_s = issued_s + time.perf_counter() - t0  # only what the put did not hide
            issued_s = 0.0
            if overlap and gi + 1 < groups:
                t0 = time.perf_counter()
                pending = start(gi + 1)
                issued_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            ref = ray.put(buf.numpy())
            t2 = time.perf_counter()
            if not overlap and gi + 1 < groups:
                pending = start(gi + 1)  # a host copy: timed as the next group's extract
                issued_s = time.perf_counter() - t2
            nbytes = buf.numel()
            meta = GroupMeta(
                index=gi,
                groups=groups,
                first_layer=first,
                shapes=tuple(tuple(t.shape) for t in part),
                dtypes=tuple(_dtype_name(t.dtype) for t in part),
                offsets=offsets,
                tokens=tokens,
                bytes=nbytes,
                extract_s=extract_s,
                put_s=t2 - t1,
                send_s=t2 - t_start,
                src_node=src_node,
                checksum=checksum,
                ready_ts=ready_ts,
            )
            acks.append(directory.register.remote(key, gi, groups, meta, [ref]))
            stats.bytes += nbytes
            stats.extract_s += meta.extract_s
            stats.put_s += meta.put_s
            stats.send_s = meta.send_s
            del ref, buf
    finally:
        for stream in pending[2]:  # a put that raised may leave the next copy in flight
            stream.synchronize()
        for buf in staging:
            STAGING.give(buf, pinned)
    # A dead directory surfaces here, not as a silent hang on the receiver; a key the receiver
    # already gave up on refuses the registration, and nobody took those bytes.
    stats.taken = all(ray.get(acks))
    if run_id and stats.taken:
        observe_send(stats, run_id, cell_id)
    return stats


def reason_of(e: BaseException) -> str:
    """One line naming an exception, short enough for a parquet column."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:_ERROR_CHARS]


class Cancelled(KVUnavailable):
    """The request the KV was for ended while it was on its way."""


_CANCEL_POLL_S = 0.5


def _take(directory: Any, key: str, index: int, cfg: KVTransferConfig, cancelled: Callable[[], bool] | None) -> dict[str, Any]:
    """The directory's next groups of `key`; with a cancel check, waited for in slices so that an
    aborted request does not hold its blocks for the whole `ref_timeout_s`."""
    if cancelled is None:
        return ray.get(directory.take.remote(key, index, cfg.ref_timeout_s))
    deadline = time.monotonic() + cfg.ref_timeout_s
    while True:
        left = deadline - time.monotonic()
        entry = ray.get(directory.take.remote(key, index, max(0.0, min(_CANCEL_POLL_S, left))))
        if not entry.get("timeout") or left <= _CANCEL_POLL_S:
            if entry.get("timeout"):
                entry["error"] = f"no reference for layer group {index} within {cfg.ref_timeout_s:g} s"
            return entry
        if cancelled():
            raise Cancelled("request ended while its KV was awaited")


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
    cancelled: Callable[[], bool] | None = None,
) -> TransferRecord:
    """Fetch `key`'s layer groups in order and hand each to `inject`; never raises.

    On any failure (no reference in time, sender failed, object lost because its owner died or
    it was evicted, fetch timeout, a layer that does not fit, a checksum that differs, the request
    cancelled) the record has ok=False and the reason; the key is dropped from the directory so
    nothing of it lingers, and the caller recomputes the prefill itself.
    """
    rec = TransferRecord(run_id=run_id, cell_id=cell_id, request_id=request_id, key=key, dst_node=ray.get_runtime_context().get_node_id())
    spent: dict[str, float] = {}

    def add(stage: str, since: float) -> float:
        now = time.perf_counter()
        spent[stage] = spent.get(stage, 0.0) + (now - since)
        return now

    t_start = time.perf_counter()
    groups: int | None = None
    ready_ts: float | None = None
    try:
        gi = 0
        while groups is None or gi < groups:
            t = time.perf_counter()
            # Every group already registered comes in one call; only the first is waited for.
            entry = _take(directory, key, gi, cfg, cancelled)
            t = add("wait_ref_s", t)
            if "error" in entry:
                raise KVUnavailable(entry["error"])
            batch = entry["groups"]
            del entry
            batch.reverse()
            while batch:  # popped, so each group's object is released once it is injected
                if cancelled is not None and cancelled():
                    raise Cancelled("request ended while its KV was arriving")
                meta, refs = batch.pop()
                groups = meta.groups
                rec.tokens, rec.src_node, ready_ts = meta.tokens, meta.src_node, meta.ready_ts
                spent["extract_s"] = spent.get("extract_s", 0.0) + meta.extract_s
                spent["put_s"] = spent.get("put_s", 0.0) + meta.put_s
                rec.send_s = meta.send_s
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.fetch_timeout_s, fetch_local=True)
                t = add("fetch_s", t)
                if len(ready) < len(refs):
                    raise KVUnavailable(f"fetch of layer group {gi} timed out after {cfg.fetch_timeout_s:g} s")
                flat = as_bytes(ray.get(refs[0]))
                t = add("get_s", t)
                inject.group(flat, meta)
                t = add("inject_s", t)
                rec.bytes += meta.bytes
                rec.groups += 1
                del flat, refs, ready
                gi += 1
            del batch
        t = time.perf_counter()
        inject.finish()
        add("inject_s", t)
        rec.ok = True
        rec.status = "ok"
        rec.injected_mono = time.monotonic()
        if ready_ts is not None and rec.src_node == rec.dst_node:
            rec.ready_to_injected_s = rec.injected_mono - ready_ts
    except Exception as e:  # every failure becomes a recorded reason and a recompute
        rec.error = reason_of(e)
        rec.status = "cancelled" if isinstance(e, Cancelled) else "failed"
        with contextlib.suppress(Exception):  # the device itself failed: nothing more to wait for
            inject.settle()
        with contextlib.suppress(Exception):  # a dead directory has nothing left to drop
            ray.get(directory.drop.remote(key), timeout=30)
    rec.total_s = time.perf_counter() - t_start
    rec.direct_groups = inject.direct
    for stage, v in spent.items():
        setattr(rec, stage, v)
    if "wait_ref_s" in spent:
        rec.stall_s = spent["wait_ref_s"] + spent.get("fetch_s", 0.0)
    if rec.tokens is not None and kv_bytes_per_token:
        rec.analytic_bytes = rec.tokens * kv_bytes_per_token
    observe_receive(rec)
    return rec
