"""Step-level continuous batching, shared by the reference and the simulated engines.

One engine thread owns the model. Each iteration admits waiting requests up to the batch limit
(prefill, one request at a time, so a prefill never pads another's), then runs ONE decode step for
every active sequence together. New arrivals therefore join the running batch at the next step, as
in vLLM, and a concurrency sweep on CPU measures real batching rather than a queue of single
requests. Tokens go back to the asyncio side through `loop.call_soon_threadsafe`.

Disaggregation adds two kinds of admission and leaves the ordinary path as it was: a prefill-only
sequence hands its KV state out right after its prefill and finishes with that one token; an
injected sequence arrives with its KV already filled (moved from another engine) and its first
token known, so it joins the running batch without a prefill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from actors.engines.base import EngineAdapter, EngineInfo, EngineRequest, MemoryReport, TokenDelta


class StepModel(Protocol):
    """What the batcher needs from a model: prefill one prompt, decode one step for many."""

    def info(self) -> EngineInfo: ...

    def prefill(self, prompt_token_ids: list[int], capacity: int) -> tuple[int, Any]:
        """Run the prompt; return the first generated token and the sequence's KV state."""

    def decode(self, states: list[Any], last_tokens: list[int]) -> list[int]:
        """One decode step for a batch; extends each state by one position in place."""

    def memory(self) -> MemoryReport:
        """Memory decomposition (safe to call from another thread while the engine runs)."""

    def reset(self) -> None:
        """Between cells: open new peak windows and drop any state carried from pass to pass."""


@runtime_checkable
class KVStepModel(StepModel, Protocol):
    """A model with real KV, which disaggregation moves; the simulated one has none."""

    def export_kv(self, state: Any) -> list[Any]:
        """The state's filled KV, one tensor per layer."""

    def import_kv(self, num_tokens: int, capacity: int) -> tuple[Any, list[Any]]:
        """A fresh state for `num_tokens` positions and the per-layer tensors to fill it through."""


@dataclass
class _Seq:
    req: EngineRequest
    emit: Callable[[TokenDelta], object]
    t_queued: float
    state: Any = None
    last_token: int = -1
    generated: int = 0
    t_prefill_start: float = 0.0
    t_prefill_end: float = 0.0
    t_first_token: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    # Prefill only: called in the engine thread with the KV state right after the prefill.
    export: Callable[[Any], None] | None = None
    # (first token, filled KV state) made elsewhere: admitted without a prefill.
    injected: tuple[int, Any] | None = None


class ContinuousBatcher:
    def __init__(self, model: StepModel, max_batch_size: int):
        self.model = model
        self.max_batch_size = max_batch_size
        self._inbox: queue.SimpleQueue[_Seq | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pdbench-engine", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(
        self,
        req: EngineRequest,
        emit: Callable[[TokenDelta], object],
        *,
        export: Callable[[Any], None] | None = None,
        injected: tuple[int, Any] | None = None,
    ) -> None:
        self._inbox.put(_Seq(req=req, emit=emit, t_queued=time.monotonic(), export=export, injected=injected))

    # --- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        waiting: deque[_Seq] = deque()
        active: list[_Seq] = []
        while not self._stop.is_set():
            block = not active and not waiting
            try:
                item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
                while item is not None:
                    waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            while waiting and len(active) < self.max_batch_size:
                seq = waiting.popleft()
                if self._admit(seq):
                    active.append(seq)
            if active:
                active = self._decode(active)
        for seq in list(waiting) + active:
            seq.emit(TokenDelta(finished=True, error="engine stopped"))

    def _admit(self, seq: _Seq) -> bool:
        if seq.injected is None:
            return self._prefill(seq)
        tok, seq.state = seq.injected
        seq.injected = None
        # No prefill ran here: its start and end mark the admission into the running batch.
        seq.t_prefill_start = seq.t_prefill_end = seq.t_first_token = time.monotonic()
        return self._push(seq, tok, seq.t_first_token)

    def _prefill(self, seq: _Seq) -> bool:
        seq.t_prefill_start = time.monotonic()
        try:
            capacity = len(seq.req.prompt_token_ids) + seq.req.max_tokens
            tok, seq.state = self.model.prefill(seq.req.prompt_token_ids, capacity)
            if seq.export is not None:
                seq.export(seq.state)
        except Exception as e:  # a bad request fails alone, the engine goes on
            seq.emit(TokenDelta(finished=True, error=f"prefill failed: {e!r}"))
            return False
        seq.t_prefill_end = seq.t_first_token = time.monotonic()
        return self._push(seq, tok, seq.t_first_token)

    def _decode(self, active: list[_Seq]) -> list[_Seq]:
        try:
            toks = self.model.decode([s.state for s in active], [s.last_token for s in active])
        except Exception as e:
            for s in active:
                s.emit(TokenDelta(finished=True, error=f"decode failed: {e!r}"))
            return []
        self.steps += 1
        now = time.monotonic()
        return [s for s, t in zip(active, toks, strict=True) if self._push(s, t, now)]

    def _push(self, seq: _Seq, tok: int, now: float) -> bool:
        """Emit one token; return whether the sequence stays active."""
        seq.generated += 1
        seq.last_token = tok
        done = seq.generated >= seq.req.max_tokens or seq.export is not None
        delta = TokenDelta(token_ids=[tok], token_s=[now - seq.t_queued], finished=done)
        if done:
            delta.server = {
                "server_queue_s": seq.t_prefill_start - seq.t_queued,
                "prefill_s": seq.t_prefill_end - seq.t_prefill_start,
                "transfer_s": None,
                # Aggregated: the first token comes out of the prefill pass itself.
                "first_decode_s": seq.t_first_token - seq.t_prefill_end,
                "server_e2e_s": now - seq.t_queued,
            }
            seq.state = None
        seq.emit(delta)
        return not done


@dataclass
class Prefilled:
    """A prefill-only request's result: what the prefill side sends to the decode side."""

    first_token: int
    layers: list[Any]  # the prompt's KV, one tensor per layer (views into the engine's state)
    num_tokens: int
    server: dict[str, Any]  # the prefill engine's server_queue_s and prefill_s


class BatchingEngine(EngineAdapter):
    """EngineAdapter over a StepModel built lazily in `start` (inside the actor, on its device)."""

    def __init__(self, build_model: Callable[[], StepModel], max_batch_size: int):
        self._build_model = build_model
        self._max_batch_size = max_batch_size
        self._batcher: ContinuousBatcher | None = None
        self._model: StepModel | None = None

    async def start(self) -> EngineInfo:
        model = await asyncio.to_thread(self._build_model)
        self._model = model
        self._batcher = ContinuousBatcher(model, self._max_batch_size)
        self._batcher.start()
        return model.info()

    async def memory(self) -> dict[str, Any]:
        assert self._model is not None, "engine not started"
        return dataclasses.asdict(await asyncio.to_thread(self._model.memory))

    async def reset(self) -> None:
        assert self._model is not None, "engine not started"
        await asyncio.to_thread(self._model.reset)

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        async for delta in self._stream(request):
            yield delta

    async def prefill_export(self, request: EngineRequest) -> Prefilled:
        """Prefill only, queued like any request; return the first token and the KV to send."""
        assert self._batcher is not None, "engine not started"
        loop = asyncio.get_running_loop()
        layers: asyncio.Future[list[Any]] = loop.create_future()
        model = self._kv_model()

        def export(state: Any) -> None:  # engine thread
            views = model.export_kv(state)
            loop.call_soon_threadsafe(layers.set_result, views)

        last = TokenDelta()
        async for delta in self._stream(request, export=export):
            last = last.merge(delta)
        if last.error is not None:
            raise RuntimeError(last.error)
        return Prefilled(
            first_token=last.token_ids[0],
            layers=await layers,
            num_tokens=len(request.prompt_token_ids),
            server=dict(last.server or {}),
        )

    def import_kv(self, num_tokens: int, capacity: int) -> tuple[Any, list[Any]]:
        """A state to fill with KV from elsewhere (thread-safe: it only allocates)."""
        return self._kv_model().import_kv(num_tokens, capacity)

    def _kv_model(self) -> KVStepModel:
        assert self._model is not None, "engine not started"
        if not isinstance(self._model, KVStepModel):
            raise TypeError(f"{type(self._model).__name__} has no KV to move: disaggregation needs engine.kind reference or vllm")
        return self._model

    async def generate_injected(self, request: EngineRequest, first_token: int, state: Any) -> AsyncIterator[TokenDelta]:
        """Stream a request whose prompt KV is already in `state`; `first_token` comes out first."""
        async for delta in self._stream(request, injected=(first_token, state)):
            yield delta

    async def _stream(self, request: EngineRequest, **admission: Any) -> AsyncIterator[TokenDelta]:
        assert self._batcher is not None, "engine not started"
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._batcher.submit(request, lambda d: loop.call_soon_threadsafe(inbox.put_nowait, d), **admission)
        while True:
            delta = await inbox.get()
            # Coalesce what piled up: a slow consumer gets fewer, larger deltas, never stale ones.
            while not delta.finished and not inbox.empty():
                delta = delta.merge(inbox.get_nowait())
            yield delta
            if delta.finished:
                return

    async def shutdown(self) -> None:
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)
            self._batcher = None
