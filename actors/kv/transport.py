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

With a tensor transport (`tensor_transport="nixl"`: Ray Direct Transport, the `ray-rdt-nixl`
backend) a group is packed into a fresh buffer on the KV's own device (a GPU-to-GPU gather, no
host copy), `ray.put(..., _tensor_transport="nixl")` leaves the bytes where they are and puts only
their NIXL descriptors into the object store, and the receiver's `ray.get` reads them with NIXL
(UCX: CUDA IPC or NVLink between GPUs of one host, RDMA across hosts) straight into a buffer on its
own device (actors/kv/rdt.py: one agent and one registered pool per process). The stages and their
names stay the same: put_s includes the copy into the pool, get_s the NIXL read. The pool's block
is free again once the last reference to its object is gone.

With `put_process` (kv_transfer.put_process, actors/kv/putter.py) the host staging buffers are shared
memory and a putter process on the same node writes each group into the object store, so the copy
does not hold the engine process's GIL; the object is still owned by the sender's process, and
put_s is the call to the putter (submit, its copy, its reply).

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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.experimental import set_target_for_ref

from actors.kv import putter, rdt
from actors.kv.accounting import SendStats, TransferRecord, observe_receive, observe_send
from actors.kv.spec import KVTransferConfig
from actors.kv.staging import STAGING, Staging, host_to_device

_ERROR_CHARS = 600


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
    send_s: float  # from the start of publish to the end of this group's put: the largest is the sender's wall
    src_node: str
    checksum: int | None = None  # kv_checksum of the group's layers on the sender (None: not computed)
    ready_ts: float | None = None  # sender's CLOCK_MONOTONIC when the KV was ready (host-wide on Linux)
    tensor_transport: str | None = None  # None: the bytes are the object; "nixl": Ray Direct Transport


_CHECKSUM_CHUNK = 1 << 22  # int32 words per step: bounds the int64 temporaries (32 MiB each)
_WEIGHTS: dict[Any, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(_CHECKSUM_CHUNK, dtype=torch.int64, device=device) % 65521 + 1
    return _WEIGHTS[device]


def kv_checksum(layers: Sequence[torch.Tensor]) -> int:
    """`checksum_tensor`'s value (the one wait for the device)."""
    return checksum_value(checksum_tensor(layers))


def checksum_value(acc: torch.Tensor) -> int:
    """A queued `checksum_tensor` read back (waits for the device) as the non-negative int that travels."""
    return int(acc) & ((1 << 63) - 1)


def checksum_tensor(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """A position-weighted sum of the layers' bytes (as int32 words), computed where they live.

    Why: with random weights the token oracle cannot tell right KV from wrong KV, so the bytes are
    checked directly: the sender sums what it gathered, the receiver sums what landed in its
    blocks. Weighting by position within a chunk, by chunk and by layer catches blocks or layers
    that arrive swapped, not only bytes that changed. int64 sums wrap identically on every device,
    so CPU and GPU agree. The sum stays on the layers' device, queued on the current stream: a
    receiver queues it right after a group's copies and reads it when the transfer is done."""
    if not layers:
        return torch.zeros((), dtype=torch.int64)
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
    return acc


class Injector:
    """Puts received layers where the engine wants them (its device memory, its block layout).

    `group` takes one layer group's packed bytes; the default unpacks them and hands each layer to
    `__call__`. `finish` waits for outstanding copies, raises if a layer is missing, and compares
    each group's checksum (when the sender sent one) with the bytes that `landed` holds."""

    layers: int
    device: torch.device  # where a group that travels by tensor transport is fetched to
    direct = 0  # groups copied straight from registered object-store memory (BlockInjector on a GPU)

    def __init__(self) -> None:
        self._seen: set[int] = set()
        # (first layer, layer count, sender's checksum, the landed bytes' sum if already queued)
        self._sums: list[tuple[int, int, int, torch.Tensor | None]] = []

    def __call__(self, layer: int, host: torch.Tensor) -> None:
        raise NotImplementedError

    def landed(self, layer: int) -> torch.Tensor:
        """The received bytes of `layer`, shaped as sent (what the checksum is taken over)."""
        raise NotImplementedError

    def group(self, flat: torch.Tensor, meta: GroupMeta) -> None:
        for j, layer in enumerate(unpack(flat, meta)):
            self(meta.first_layer + j, layer)
        self._expect(meta)

    def _expect(self, meta: GroupMeta, landed_now: bool = False) -> None:
        """Note the group's checksum; with `landed_now` (the caller's current stream orders the
        group's copies) its landed bytes are summed at once, while later groups are still on their
        way, instead of all at `finish`, after the last group."""
        if meta.checksum is not None:
            n = len(meta.shapes)
            got = checksum_tensor([self.landed(meta.first_layer + j) for j in range(n)]) if landed_now else None
            self._sums.append((meta.first_layer, n, meta.checksum, got))

    def settle(self) -> None:
        """Wait for outstanding copies (a receive that failed halfway: nothing may still be writing
        into memory its owner frees next)."""

    def fence(self) -> Any:
        """An event after which nothing queued so far reads a group's received bytes (None: every
        read is done when `group` returns, as here: copies out of the bytes are synchronous)."""
        return None

    def finish(self) -> None:
        self.settle()
        missing = sorted(set(range(self.layers)) - self._seen)
        if missing:
            raise ValueError(f"layers never received: {missing[:8]}{' …' if len(missing) > 8 else ''}")
        for first, n, want, queued in self._sums:
            got = checksum_value(queued if queued is not None else checksum_tensor([self.landed(first + j) for j in range(n)]))
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
        self.device = self.dsts[0].device if self.dsts else torch.device("cpu")
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
        if host.device == dst.device:  # a tensor transport brought it here already
            dst.copy_(host)
        elif dst.is_cuda:
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


def as_bytes(buf: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An object-store buffer as a flat uint8 tensor over the same (read-only) memory; a group
    that came by tensor transport is that tensor already."""
    if isinstance(buf, torch.Tensor):
        return buf
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


class _Sender:
    """One publish's pipeline. From a GPU, group i+1's device→host copy runs on the copy engine
    while group i is put; with `put_threads` > 1 several groups are put at once (each put has a
    fixed cost of its own, creating and sealing the object, that a serial sender pays in turn), and
    copies run ahead into as many staging buffers. A buffer is filled again only after its put
    returned. Host layers are packed one group at a time, each while the previous ones are put.

    With `ready` (layers still being written by a forward pass, actors/kv/layerwise.py), a group's
    copy starts once `ready(end)` says its layers are there, and puts always run in the pool, so a
    put never waits behind the wait for the next group's layers."""

    def __init__(
        self,
        directory: Any,
        key: str,
        layers: Sequence[torch.Tensor],
        cfg: KVTransferConfig,
        tokens: int,
        ready_ts: float | None,
        ready: Callable[[int], float] | None = None,
        tensor_transport: str | None = None,
    ):
        self.directory, self.key, self.layers, self.cfg, self.tokens, self.ready_ts = directory, key, layers, cfg, tokens, ready_ts
        self.ready = ready
        self.tensor_transport = tensor_transport
        self.group_ready: dict[int, float] = {}
        self.spans = layer_groups(layers, cfg.max_group_bytes)
        self.pinned = any(t.is_cuda for t in layers)
        self.overlap = self.pinned and len(self.spans) > 1
        nbuf = min(len(self.spans), cfg.put_threads + (1 if self.overlap else 0))
        size = max(layout(layers[a:b])[1] for a, b in self.spans)
        # A tensor transport keeps each group's buffer until its object is freed: a fresh one per
        # group, on the KV's device; the object store copies out of reused host staging, with
        # `put_process` shared memory that the putter process copies from (actors/kv/putter.py).
        self.putter = putter.client(cfg.put_threads) if cfg.put_process and not tensor_transport else None
        self.store: Staging | putter.PutterClient = self.putter or STAGING
        self.staging = [] if tensor_transport else [self.store.take(size, self.pinned) for _ in range(nbuf)]
        pooled = (cfg.put_threads > 1 or ready is not None) and len(self.spans) > 1
        self.pool = ThreadPoolExecutor(cfg.put_threads, thread_name_prefix="pdbench-put") if pooled else None
        self.copies: dict[int, tuple[torch.Tensor, tuple[int, ...], list[Any], float]] = {}
        self.puts: dict[int, Future[tuple[GroupMeta, Any]]] = {}
        self.src_node = ray.get_runtime_context().get_node_id()
        self.t_start = time.perf_counter()

    def run(self) -> list[tuple[GroupMeta, Any]]:
        """Every group put and registered: (meta, the directory's acknowledgement) in group order."""
        groups = len(self.spans)
        self._start_copy(0)
        for gi, (first, end) in enumerate(self.spans):
            checksum = kv_checksum(self.layers[first:end]) if self.cfg.checksum else None
            t0 = time.perf_counter()
            buf, offsets, streams, issued_s = self.copies.pop(gi)
            for stream in streams:
                stream.synchronize()
            extract_s = issued_s + time.perf_counter() - t0  # only what the puts did not hide
            if self.pool is not None:  # the put runs beside the next group's copy (and its wait)
                self._put(gi, buf, offsets, extract_s, checksum)
                if gi + 1 < groups:
                    self._start_copy(gi + 1)
                continue
            if self.overlap and gi + 1 < groups:
                self._start_copy(gi + 1)
            self._put(gi, buf, offsets, extract_s, checksum)
            if not self.overlap and gi + 1 < groups:
                self._start_copy(gi + 1)  # a host copy: timed as the next group's extract
        return [self.puts[gi].result() for gi in range(groups)]

    def _start_copy(self, gi: int) -> None:
        if self.ready is not None:  # waiting for the forward pass is not extraction
            self.group_ready[gi] = self.ready(self.spans[gi][1])
        t0 = time.perf_counter()
        a, b = self.spans[gi]
        if self.tensor_transport:
            out = torch.empty(layout(self.layers[a:b])[1], dtype=torch.uint8, device=self.layers[a].device)
        else:
            if gi - len(self.staging) in self.puts:
                self.puts[gi - len(self.staging)].result()  # its buffer is ours again
            out = self.staging[gi % len(self.staging)]
        self.copies[gi] = (*_pack_start(self.layers[a:b], out), time.perf_counter() - t0)

    def _put(self, gi: int, buf: torch.Tensor, offsets: tuple[int, ...], extract_s: float, checksum: int | None) -> None:
        first, end = self.spans[gi]
        part = self.layers[first:end]

        def put() -> tuple[GroupMeta, Any]:
            t1 = time.perf_counter()
            if self.tensor_transport:
                ref = rdt.put(buf, self.cfg.rdt_pool_bytes, time.monotonic() + self.cfg.ref_timeout_s)
            elif self.putter is not None:
                ref = self.putter.put(buf)
            else:
                ref = ray.put(buf.numpy())
            t2 = time.perf_counter()
            meta = GroupMeta(
                index=gi,
                groups=len(self.spans),
                first_layer=first,
                shapes=tuple(tuple(t.shape) for t in part),
                dtypes=tuple(_dtype_name(t.dtype) for t in part),
                offsets=offsets,
                tokens=self.tokens,
                bytes=buf.numel(),
                extract_s=extract_s,
                put_s=t2 - t1,
                send_s=t2 - self.t_start,
                src_node=self.src_node,
                checksum=checksum,
                ready_ts=self.group_ready.get(gi, self.ready_ts),
                tensor_transport=self.tensor_transport,
            )
            return meta, self.directory.register.remote(self.key, gi, len(self.spans), meta, [ref])

        if self.pool is not None:
            self.puts[gi] = self.pool.submit(put)
        else:
            done: Future[tuple[GroupMeta, Any]] = Future()
            try:
                done.set_result(put())
            except BaseException as e:
                done.set_exception(e)
            self.puts[gi] = done

    def close(self) -> None:
        """Nothing may still write into or read from the staging buffers once they are given back."""
        wait(list(self.puts.values()))
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for _, _, streams, _ in self.copies.values():  # a put that raised may leave a copy in flight
            for stream in streams:
                stream.synchronize()
        for buf in self.staging:
            self.store.give(buf, self.pinned)


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
    ready: Callable[[int], float] | None = None,
    tensor_transport: str | None = None,
) -> SendStats:
    """Put `layers` (one request's KV, one tensor per layer) into the object store under `key`.

    Every group's reference goes to the directory as soon as it exists; this process drops its own
    reference right after, so the object lives exactly as long as the directory or the receiver
    holds it (this process stays its owner: if it dies, the object is lost, and the receiver
    sees that). `ready_ts` (CLOCK_MONOTONIC) is when the KV was complete on the sender; it travels
    with every group so a receiver on the same host can time KV ready → KV injected. With `ready`,
    `layers` are still being written: `ready(end)` blocks until layers [0, end) hold their KV and
    returns when they did, each group's own ready time (the last group's is the KV's). With
    `tensor_transport` ("nixl") the groups travel by Ray Direct Transport (module docstring).
    """
    sender = _Sender(directory, key, layers, cfg, tokens, ready_ts, ready, tensor_transport)
    try:
        sent = sender.run()
    finally:
        sender.close()
    metas = [m for m, _ in sent]
    stats = SendStats(
        key=key,
        tokens=tokens,
        groups=len(metas),
        bytes=sum(m.bytes for m in metas),
        extract_s=sum(m.extract_s for m in metas),
        put_s=sum(m.put_s for m in metas),
        send_s=max(m.send_s for m in metas),
        src_node=sender.src_node,
    )
    # A dead directory surfaces here, not as a silent hang on the receiver; a key the receiver
    # already gave up on refuses the registration, and nobody took those bytes.
    stats.taken = all(ray.get([ack for _, ack in sent]))
    if run_id and stats.taken:
        observe_send(stats, run_id, cell_id)
    return stats


def reason_of(e: BaseException) -> str:
    """One line naming an exception, short enough for a parquet column. Its lines are joined: Ray's
    NIXL errors put the cause on the lines after "The exception thrown from nixl transfer was:"."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return f"{type(e).__name__}: {text}"[:_ERROR_CHARS]


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


class _Receiver:
    """One receive's state: the record it fills, and the time spent per stage (summed over groups)."""

    def __init__(
        self, directory: Any, key: str, inject: Injector, cfg: KVTransferConfig, rec: TransferRecord, cancelled: Callable[[], bool] | None
    ):
        self.directory, self.key, self.inject, self.cfg, self.rec, self.cancelled = directory, key, inject, cfg, rec, cancelled
        self.spent: dict[str, float] = {}
        self.ready_ts: float | None = None
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] = self.spent.get(stage, 0.0) + (now - self.t)
        self.t = now

    def run(self) -> None:
        gi, groups = 0, None
        while groups is None or gi < groups:
            self.t = time.perf_counter()
            # Every group already registered comes in one call; only the first is waited for.
            entry = _take(self.directory, self.key, gi, self.cfg, self.cancelled)
            self.lap("wait_ref_s")
            if "error" in entry:
                raise KVUnavailable(entry["error"])
            batch = entry["groups"]
            del entry
            groups = batch[0][0].groups
            gi = self._batch(gi, batch)
        self.t = time.perf_counter()
        self.inject.finish()
        self.lap("inject_s")

    def _batch(self, gi: int, batch: list[Any]) -> int:
        """The groups one take handed over: made local with one `ray.wait` and mapped with one
        `ray.get` (each is a round trip to the raylet, ~0.7 ms per object on a 2-core box when made
        group by group), then injected in order, each group's bytes released once injected. Groups
        that travel by NIXL land in receive buffers registered once (rdt.ReceiveBuffers), which go
        back for reuse once the injector's copies out of them are done."""
        held: list[torch.Tensor] = []
        try:
            for meta, rs in batch:
                if meta.tensor_transport:  # NIXL reads the bytes straight onto the engine's device
                    held.append(rdt.RECEIVE.take(self.inject.device, meta.bytes))
                    set_target_for_ref(rs[0], [held[-1]])
            return self._inject_batch(gi, batch)
        finally:
            if held:
                fence = self.inject.fence()
                for buf in held:
                    rdt.RECEIVE.give(buf, fence)

    def _inject_batch(self, gi: int, batch: list[Any]) -> int:
        refs = [r for _, rs in batch for r in rs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.fetch_timeout_s, fetch_local=True)
        self.lap("fetch_s")
        if len(ready) < len(refs):
            span = f"group {gi}" if len(batch) == 1 else f"groups {gi}..{gi + len(batch) - 1}"
            raise KVUnavailable(f"fetch of layer {span} timed out after {self.cfg.fetch_timeout_s:g} s")
        values: list[Any] = ray.get([rs[0] for _, rs in batch])
        self.lap("get_s")
        del refs, ready
        for j in range(len(batch)):
            if self.cancelled is not None and self.cancelled():
                raise Cancelled("request ended while its KV was arriving")
            meta = batch[j][0]
            batch[j] = None  # this group's reference and bytes go once injected
            flat, values[j] = as_bytes(values[j]), None
            self._account(meta)
            self.inject.group(flat, meta)
            del flat
            self.lap("inject_s")
        return gi + len(batch)

    def _account(self, meta: GroupMeta) -> None:
        rec = self.rec
        rec.tokens, rec.src_node = meta.tokens, meta.src_node
        if meta.index == meta.groups - 1:  # the KV was ready when its last group was
            self.ready_ts = meta.ready_ts
        self.spent["extract_s"] = self.spent.get("extract_s", 0.0) + meta.extract_s
        self.spent["put_s"] = self.spent.get("put_s", 0.0) + meta.put_s
        rec.send_s = max(rec.send_s or 0.0, meta.send_s)
        rec.bytes += meta.bytes
        rec.groups += 1

    def failed(self, e: BaseException) -> None:
        self.rec.error = reason_of(e)
        self.rec.status = "cancelled" if isinstance(e, Cancelled) else "failed"
        with contextlib.suppress(Exception):  # the device itself failed: nothing more to wait for
            self.inject.settle()
        with contextlib.suppress(Exception):  # a dead directory has nothing left to drop
            ray.get(self.directory.drop.remote(self.key), timeout=30)


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
    t_start = time.perf_counter()
    r = _Receiver(directory, key, inject, cfg, rec, cancelled)
    try:
        r.run()
        rec.ok, rec.status, rec.injected_mono = True, "ok", time.monotonic()
        if r.ready_ts is not None and rec.src_node == rec.dst_node:
            rec.ready_to_injected_s = rec.injected_mono - r.ready_ts
    except Exception as e:  # every failure becomes a recorded reason and a recompute
        r.failed(e)
    rec.total_s = time.perf_counter() - t_start
    rec.direct_groups = inject.direct
    for stage, v in r.spent.items():
        setattr(rec, stage, v)
    if "wait_ref_s" in r.spent:
        rec.stall_s = r.spent["wait_ref_s"] + r.spent.get("fetch_s", 0.0)
    if rec.tokens is not None and kv_bytes_per_token:
        rec.analytic_bytes = rec.tokens * kv_bytes_per_token
    observe_receive(rec)
    return rec
