"""The connector's worker side, off the engine step: loads and saves run in a thread pool while
vLLM keeps stepping, and every one is reported back to vLLM exactly once.

vLLM 0.26's contract for asynchronous connectors (vllm/v1/core/sched/scheduler.py) is strict:
a load's request id must come back in `finished_recving` once, failed or not, with its failed
blocks in the same pass; a save's id comes back in `finished_sending` only after vLLM finished the
request (it was in a `finished_req_ids` given to `finished`), or the scheduler frees blocks it no
longer holds and asserts. This module keeps that book, vLLM-free, so a fake scheduler tests it on
any machine (tests/test_kv_async.py); actors/kv/vllm_connector.py calls it from vLLM's hooks.

What runs on the engine's thread is only: recording CUDA events on the engine's stream (the
jobs' copies are ordered after them; `save: layerwise` records one per layer and wakes the senders
whose layers are in, actors/kv/layerwise.py), submitting jobs, and polling results. Its wall time is summed as the
engine's `blocked_s` (docs/metrics.md: stall).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from actors.kv import putter
from actors.kv.accounting import TransferRecord
from actors.kv.blocks import BlockInjector, StepPlan, Transfer, gather_blocks
from actors.kv.layerwise import LayerProgress, SaveGather
from actors.kv.spec import KVTransferConfig
from actors.kv.transport import publish, reason_of, receive

log = logging.getLogger("pdbench.kv_jobs")

_REPORT_EVERY_S = 1.0


class ConnectorWorker:
    """One per vLLM worker process. `directory` is the KV directory actor's handle; `registration`
    returns the object store's CUDA registration (or None: receivers stage)."""

    def __init__(
        self,
        cfg: KVTransferConfig,
        directory: Any,
        *,
        run_id: str = "",
        cell_id: str = "",
        engine: str = "",
        kv_bytes_per_token: int | None = None,
        registration: Callable[[], Any] = lambda: None,
        store: dict[str, Any] | None = None,
        tensor_transport: str | None = None,
    ):
        self.cfg = cfg
        self.tensor_transport = tensor_transport  # None: KV bytes through the object store; "nixl": Ray Direct Transport
        self.directory = directory
        self.run_id, self.cell_id, self.engine = run_id, cell_id, engine
        self.kv_bytes_per_token = kv_bytes_per_token
        self.registration = registration
        self.store = dict(store or {})  # how this process prepared the object store (reported)
        self.caches: list[torch.Tensor] = []
        self.dim = 0
        self._pool = ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="pdbench-kv")
        self._lock = threading.Lock()
        self._loads_open: dict[str, threading.Event] = {}  # request id -> cancel flag
        self._loads_done: dict[str, set[int]] = {}  # request id -> failed block ids (empty: loaded)
        self._failed: set[int] = set()
        self._saves_open: set[str] = set()
        self._layerwise: LayerProgress | None = None  # the step's forward, for saves that follow it layer by layer
        self._saves_released: set[str] = set()  # blocks no longer needed by the job
        self._finished_seen: set[str] = set()  # open saves vLLM has finished
        self.blocked_s = 0.0
        self.steps = 0
        self.loads = 0
        self.saves = 0
        self._last_report = 0.0
        # The engine's step loop and these threads share one interpreter: bound how long a busy
        # connector thread may keep the loop waiting for the GIL.
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1e3)

    def register(self, caches: list[torch.Tensor], dim: int) -> None:
        self.caches, self.dim = caches, dim

    # ------------------------------------------------------------------ engine thread
    @contextlib.contextmanager
    def _on_engine_thread(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.blocked_s += time.perf_counter() - t0

    def _step_event(self) -> Any:
        """An event on the engine's stream after everything it queued so far (None on CPU)."""
        if not self.caches or not self.caches[0].is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.caches[0].device))
        return ev

    def start_loads(self, plan: StepPlan) -> None:
        """vLLM's start_load_kv: before the forward pass of the step whose plan this is (layer-wise
        saves start here too, their senders waiting for the layers the pass writes)."""
        with self._on_engine_thread():
            self.steps += 1
            if plan.saves and self.cfg.save == "layerwise" and self.caches:
                self._layerwise = LayerProgress(self.caches, self.dim, plan.saves)
                for k, t in enumerate(plan.saves):
                    self._submit_save(t, None, self._layerwise, k)
            if plan.loads:
                ev, t_enq = self._step_event(), time.monotonic()
                for t in plan.loads:
                    flag = threading.Event()
                    with self._lock:
                        self._loads_open[t.request_id] = flag
                    self.loads += 1
                    self._pool.submit(self._load, t, ev, t_enq, flag)
            for rid in plan.cancels:
                with self._lock:
                    cancel = self._loads_open.get(rid)
                if cancel is not None:
                    cancel.set()
            for key in plan.drops:
                self.directory.drop.remote(key)

    def layer_saved(self, index: int) -> None:
        """vLLM's save_kv_layer: layer `index`'s KV for this step is queued on the engine's stream."""
        if self._layerwise is not None:
            with self._on_engine_thread():
                self._layerwise.layer(index)

    def start_saves(self, plan: StepPlan) -> None:
        """vLLM's wait_for_save: after the forward pass that computed the saved prompts."""
        with self._on_engine_thread():
            if self._layerwise is not None:
                self._layerwise.finish()
                self._layerwise = None
                return
            if not plan.saves:
                return
            ev = self._step_event()
            for t in plan.saves:
                self._submit_save(t, ev, None, 0)

    def _submit_save(self, t: Transfer, ev: Any, progress: LayerProgress | None, k: int) -> None:
        with self._lock:
            self._saves_open.add(t.request_id)
        self.saves += 1
        self._pool.submit(self._save, t, ev, progress, k)

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM's get_finished: (finished_sending, finished_recving), each id exactly once."""
        with self._on_engine_thread():
            with self._lock:
                self._finished_seen |= finished_req_ids & self._saves_open
                recving = set(self._loads_done)
                for rid in recving:
                    self._failed |= self._loads_done.pop(rid)
                sending = self._saves_released & self._finished_seen
                self._saves_released -= sending
                self._finished_seen -= sending
                self._saves_open -= sending
            now = time.monotonic()
            if sending or recving or now - self._last_report > _REPORT_EVERY_S:
                self._last_report = now
                self._report()
        return sending or None, recving or None

    def _report(self) -> None:
        self.directory.report_engine.remote(self.engine, self.blocked_s, self.steps, self.loads, self.saves, self.store)

    def load_errors(self) -> set[int]:
        """Blocks of loads that failed, handed out in the same pass as their request ids."""
        failed, self._failed = self._failed, set()
        return failed

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {"loads": len(self._loads_open) + len(self._loads_done), "saves": len(self._saves_open)}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        putter.close()  # no save is left that could still put through it
        self._report()

    # ------------------------------------------------------------------ job threads
    def _device(self) -> Any:
        if self.caches and self.caches[0].is_cuda:
            return torch.cuda.device(self.caches[0].device)
        return contextlib.nullcontext()

    def _load(self, t: Transfer, ev: Any, t_enq: float, flag: threading.Event) -> None:
        bad = set(t.block_ids)
        rec = TransferRecord(self.run_id, self.cell_id, t.key.split("/")[0], t.key)
        try:
            queued = time.monotonic() - t_enq
            # Inference mode is per thread, and vLLM's cache tensors are inference tensors.
            with torch.inference_mode(), self._device():
                inj = BlockInjector(
                    self.caches, t.block_ids, self.dim, self.cfg.host_copy_threads, after=ev, registration=self.registration()
                )
                rec = receive(
                    self.directory,
                    t.key,
                    inj,
                    self.cfg,
                    run_id=self.run_id,
                    cell_id=self.cell_id,
                    request_id=rec.request_id,
                    kv_bytes_per_token=self.kv_bytes_per_token,
                    cancelled=flag.is_set,
                )
            rec.queued_s = queued
            rec.kv_wait_s = time.monotonic() - t_enq
            if rec.ok:
                bad = set()
        except Exception as e:  # a bug here must still end the load, or vLLM waits forever
            log.exception("pdbench: KV load %s", t.key)
            rec.error = reason_of(e)
        finally:
            with self._lock:
                self._loads_open.pop(t.request_id, None)
                self._loads_done[t.request_id] = bad
        self.directory.report.remote(t.key, rec.row())

    def _publish(self, t: Transfer, layers: list[torch.Tensor], **when: Any) -> None:
        """`publish` of one save; `when` says when its KV is ready (ready_ts, or ready for layer-wise)."""
        publish(
            self.directory,
            t.key,
            layers,
            t.tokens,
            self.cfg,
            run_id=self.run_id,
            cell_id=self.cell_id,
            tensor_transport=self.tensor_transport,
            **when,
        )

    def _save(self, t: Transfer, ev: Any, progress: LayerProgress | None, k: int) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                with self._lock:
                    self._saves_released.add(t.request_id)

        try:
            with torch.inference_mode(), self._device():
                if progress is not None:
                    gather = SaveGather(progress, k)

                    def ready(end: int) -> float:  # the gathered copy holds the KV once the last layer is in
                        ts = gather.ready(end, self.cfg.ref_timeout_s)
                        if end == len(self.caches):
                            release()
                        return ts

                    self._publish(t, gather.layers, ready=ready)
                    return
                stream = torch.cuda.Stream(self.caches[0].device) if ev is not None else None
                if ev is not None:
                    ev.synchronize()  # the forward that wrote the KV has run
                ready_ts = time.monotonic()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    layers = gather_blocks(self.caches, t.block_ids, self.dim)
                    if stream is not None:
                        stream.synchronize()
                    release()  # the gathered copy holds the KV: vLLM may reuse the blocks
                    self._publish(t, layers, ready_ts=ready_ts)
        except Exception as e:  # the decode side learns why from the directory and recomputes
            log.warning("pdbench: KV save %s failed: %s", t.key, reason_of(e))
            self.directory.fail.remote(t.key, reason_of(e))
        finally:
            release()
