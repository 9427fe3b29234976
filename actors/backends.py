"""What the load generator sends requests to: one streaming interface over any server.

A backend turns a request (`request_id`, `prompt_token_ids`, `max_tokens`) into a stream of
TokenDelta dicts (`token_ids`, `token_s`, `finished`, `error`, `server`). The load generator
knows nothing else about the server, so the same tracks measure a pdbench entry actor (Ray
streaming generator) or any OpenAI-compatible HTTP server.

The backend, not the load generator, reads the clock: it stamps `Exchange.t_sent` at the call
that hands the request to the transport, and each delta's `t_recv` right where the message came
in (the streamed item's arrival, the socket read that delivered the bytes), so neither the load
generator's own scheduling nor parsing is counted as the server's latency. A backend whose send
may be made from another thread than the event loop's (`ThreadSend`, the actor backend) lets the
load generator send open-loop requests from a sender thread that keeps the schedule while the
loop handles replies; the stamp is then taken in that thread, at the same call.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import ray
from ray.exceptions import RayError

# An open-loop send sleeps until this long before it is due, then yields to the event loop until
# it is: asyncio's timer alone wakes up late by up to a millisecond under load.
SPIN_S = 0.0005


@dataclass
class Exchange:
    """One request's send time (time.monotonic()), stamped by the backend where it leaves, and the
    client's own time from being asked to that moment (None where the two are one call).
    `not_before`: an open-loop request's due time; the backend prepares the request first and
    sends it at that moment (`ready`), so preparing it is never late."""

    t_sent: float | None = None
    client_send_s: float | None = None
    not_before: float | None = None
    # Set where a sender thread already sent the request (ThreadSend.submit, t_sent stamped there):
    # the reply stream it got back, or what the send raised. stream() then only reads the replies.
    submitted: Any = None
    submit_error: BaseException | None = None

    async def ready(self) -> None:
        if self.not_before is None:
            return
        if (coarse := self.not_before - SPIN_S - time.monotonic()) > 0:
            await asyncio.sleep(coarse)
        while time.monotonic() < self.not_before:  # never before the schedule
            await asyncio.sleep(0)


class Backend(Protocol):
    def stream(self, request: dict[str, Any], exchange: Exchange | None = None) -> AsyncIterator[dict[str, Any]]: ...

    async def hop_s(self, calls: int) -> float | None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ThreadSend(Backend, Protocol):
    def submit(self, request: dict[str, Any]) -> Any:
        """Send now from any thread; returns what `stream` reads the replies from (Exchange.submitted)."""
        ...


class HopProbe:
    """Mixed into entry actors: a streaming no-op, so a load generator can time the bare actor hop
    (call out, first streamed item back) that every request's TTFT carries."""

    async def ping(self) -> AsyncIterator[dict[str, Any]]:
        yield {}


class ActorBackend:
    """An entry actor exposing the streaming `generate(request)` of EngineActor."""

    def __init__(self, handle: Any, cell: tuple[str, str] | None = None):
        self.handle = handle
        self._generate = handle.generate.options(num_returns="streaming")
        self.cell = cell  # marked on every request: the engine begins the cell on its first (EngineHost.generate)
        # stream() gets replies the stream has already awaited, which never blocks; Ray would warn once
        # per process that a get inside an async actor blocks its loop (Ray Train silences it the same way).
        os.environ.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")

    def submit(self, request: dict[str, Any]) -> Any:
        """Thread-safe (a Ray actor call): the reply stream of the request, sent now."""
        return self._generate.remote(request if self.cell is None else {**request, "cell": self.cell})

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None) -> AsyncIterator[dict[str, Any]]:
        if exchange is not None and exchange.submit_error is not None:
            raise exchange.submit_error
        if exchange is not None and exchange.submitted is not None:
            replies = exchange.submitted
        else:
            if exchange is not None:
                await exchange.ready()
                exchange.t_sent = time.monotonic()
            replies = self.submit(request)
        async for ref in replies:
            # The stream has awaited the item before handing its ref out, so this get does not block:
            # a second `await ref` would cost a future and a wake-up of the loop per message.
            delta = ray.get(ref)
            delta["t_recv"] = time.monotonic()
            yield delta
            if delta["finished"]:
                # The last message by the entry's contract: not waiting for the end-of-stream marker
                # saves two more awaits per request (half the cost of reading the replies).
                return

    async def hop_s(self, calls: int) -> float | None:
        """Median round trip of `calls` streaming no-ops to the entry (None: it has no `ping`, or is
        dead, in which case the requests themselves will fail with the reason)."""
        if not hasattr(self.handle, "ping"):
            return None
        rtts = []
        try:
            for _ in range(calls):
                call = self.handle.ping.options(num_returns="streaming")
                t = time.monotonic()
                async for ref in call.remote():
                    ray.get(ref)  # read as stream() reads a reply
                    rtts.append(time.monotonic() - t)
        except RayError:
            return None
        return float(np.median(rtts)) if rtts else None

    async def aclose(self) -> None:
        return None


def open_backend(entry: Any, api_key: str | None = None, cell: tuple[str, str] | None = None) -> Backend:
    """An actor handle → ActorBackend (its requests marked with `cell` where given); a TargetSpec → OpenAIBackend (HTTP)."""
    from actors.openai_client import OpenAIBackend
    from actors.target import TargetSpec

    if isinstance(entry, TargetSpec):
        return OpenAIBackend(entry, api_key)
    return ActorBackend(entry, cell)
