"""Step-level continuous batching, shared by the reference and the simulated engines.

One engine thread owns the model. Each iteration admits waiting requests up to the batch limit
(prefill, one request at a time, so a prefill never pads another's), then runs ONE decode step for
every active sequence together. New arrivals therefore join the running batch at the next step, as
in vLLM, and a concurrency sweep on CPU measures real batching rather than a queue of single
requests. Tokens go back to the asyncio side through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from actors.engines.base import EngineAdapter, EngineInfo, EngineRequest, TokenDelta


class StepModel(Protocol):
    """What the batcher needs from a model: prefill one prompt, decode one step for many."""

    def info(self) -> EngineInfo: ...

    def prefill(self, prompt_token_ids: list[int], capacity: int) -> tuple[int, Any]:
        """Run the prompt; return the first generated token and the sequence's KV state."""

    def decode(self, states: list[Any], last_tokens: list[int]) -> list[int]:
        """One decode step for a batch; extends each state by one position in place."""


@dataclass
class _Seq:
    req: EngineRequest
    emit: Callable[[TokenDelta], None]
    t_queued: float
    state: Any = None
    last_token: int = -1
    generated: int = 0
    t_prefill_start: float = 0.0
    t_prefill_end: float = 0.0
    t_first_token: float = 0.0
    token_ids: list[int] = field(default_factory=list)


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

    def submit(self, req: EngineRequest, emit: Callable[[TokenDelta], None]) -> None:
        self._inbox.put(_Seq(req=req, emit=emit, t_queued=time.monotonic()))

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
                if self._prefill(seq):
                    active.append(seq)
            if active:
                active = self._decode(active)
        for seq in list(waiting) + active:
            seq.emit(TokenDelta(finished=True, error="engine stopped"))

    def _prefill(self, seq: _Seq) -> bool:
        seq.t_prefill_start = time.monotonic()
        try:
            capacity = len(seq.req.prompt_token_ids) + seq.req.max_tokens
            tok, seq.state = self.model.prefill(seq.req.prompt_token_ids, capacity)
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
        return [s for s, t in zip(active, toks) if self._push(s, t, now)]

    def _push(self, seq: _Seq, tok: int, now: float) -> bool:
        """Emit one token; return whether the sequence stays active."""
        seq.generated += 1
        seq.last_token = tok
        done = seq.generated >= seq.req.max_tokens
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


class BatchingEngine(EngineAdapter):
    """EngineAdapter over a StepModel built lazily in `start` (inside the actor, on its device)."""

    def __init__(self, build_model: Callable[[], StepModel], max_batch_size: int):
        self._build_model = build_model
        self._max_batch_size = max_batch_size
        self._batcher: ContinuousBatcher | None = None

    async def start(self) -> EngineInfo:
        model = await asyncio.to_thread(self._build_model)
        self._batcher = ContinuousBatcher(model, self._max_batch_size)
        self._batcher.start()
        return model.info()

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        assert self._batcher is not None, "engine not started"
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._batcher.submit(request, lambda d: loop.call_soon_threadsafe(inbox.put_nowait, d))
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
