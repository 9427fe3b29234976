"""The KV-handoff interface: what a transfer backend does on each side of a disaggregated pair.

The orchestrator (actors/disaggregated.py) owns one request's path, prefill → KV handoff →
decode, the transfer records and the recompute when the KV does not arrive. A backend owns only
how the prompt's KV gets from the prefill engine into the decode engine: its prefill side runs the
prompt and sends the KV under a key, its decode side brings that KV into its engine and streams
the decode. Both sides run inside the pair's Ray actors, so they may import torch or vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from actors.engines import EngineConfig, EngineInfo, EngineRequest, TokenDelta
from actors.handoffs.spec import KVHandoffConfig


class PrefillReply(TypedDict, total=False):
    """The prefill actor's answer, crossing Ray to the decode actor."""

    first_token: int | None
    num_tokens: int
    server: dict[str, Any]  # the prefill engine's server_queue_s and prefill_s
    published: bool | None  # whether the KV was sent; None: the send runs on and its outcome comes later
    publish_error: str | None


@dataclass(frozen=True)
class Prefilled:
    """A prefill's result as the decode side holds it: the reply, or why there is none."""

    reply: PrefillReply | None
    failure: str | None
    at: float  # monotonic time the decode actor had the reply (or the failure)


@dataclass(frozen=True)
class Outcome:
    """How one request's handoff ended; set by the decode side before it yields the last delta."""

    record: dict[str, Any]  # its transfers.parquet row
    ok: bool  # the decode ran on the moved KV (False: recomputed on the decode engine)
    transfer_s: float | None  # ok: reply → KV in the decode engine; else the time lost on the attempt
    retry_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further server fields the backend measures


@dataclass
class Handoff:
    """One request on the decode side, from the decode actor taking it to its last token."""

    req: EngineRequest
    key: str  # the transfer key, fresh per request
    run_id: str
    cell_id: str
    prefilled: asyncio.Future[Prefilled]  # done already unless the backend overlaps the prefill
    submitted: float | None = None  # monotonic time the decode engine got the request
    outcome: Outcome | None = None

    def ident(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "cell_id": self.cell_id, "request_id": self.req.request_id, "key": self.key}


@dataclass(frozen=True)
class PairContext:
    """What both sides are built from."""

    engine: EngineConfig
    kv: KVHandoffConfig
    directory: str  # the name of the cell's KVDirectory actor
    run_id: str
    cell_id: str


class PrefillSide(Protocol):
    async def start(self) -> EngineInfo: ...

    async def prefill(self, req: EngineRequest, key: str) -> PrefillReply:
        """Run the prompt and send its KV under `key`; return once the first token is known."""
        ...

    async def shutdown(self) -> None: ...


class DecodeSide(Protocol):
    # How the decode engine's own final stats enter the request's server fields ("" or "decode_").
    own_stats_prefix: str

    async def start(self) -> EngineInfo: ...

    def overlaps_prefill(self, req: EngineRequest) -> bool:
        """Whether the request enters the decode engine while its prefill still runs."""
        ...

    def decode(self, h: Handoff) -> AsyncIterator[TokenDelta]:
        """The decode engine's deltas for `h.req`, on the moved KV or recomputed; sets `h.submitted`
        before the engine sees the request and `h.outcome` before the finished delta."""
        ...

    async def shutdown(self) -> None: ...


def runs_anywhere() -> None:
    """The refusal check of a backend that needs nothing beyond its engine."""
    return None


@dataclass(frozen=True)
class Sides:
    prefill: Callable[[PairContext], PrefillSide]
    decode: Callable[[PairContext], DecodeSide]
    # Why this backend cannot run where it is called (a missing library, device or transport), in
    # one line; None where it can. Called on the machine of the pair's engines, before they start.
    available: Callable[[], str | None] = runs_anywhere
