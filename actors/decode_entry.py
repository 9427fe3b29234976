"""What every disaggregated decode actor does per request, whichever engine moves the KV.

The decode actor is the pair's entry: it asks the prefill actor to run the prompt under a fresh
transfer key, then continues the request itself (`_decode`, engine-specific). A prefill that
fails (dead actor, engine error) is not the request's end: the decode side recomputes it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from actors.backends import HopProbe
from actors.kv.transport import reason_of
from actors.metrics import metered


class DecodeEntry(HopProbe):
    prefill: Any  # the pair's prefill actor handle

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for delta in metered(self._generate(request), "decode", len(request["prompt_token_ids"])):
            yield delta

    async def _generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        t0 = time.monotonic()
        key = f"{request['request_id']}/{secrets.token_hex(6)}"
        try:
            reply, failure = await self.prefill.prefill.remote(request, key), None
        except Exception as e:  # dead prefill actor or failed prefill: recompute here
            reply, failure = None, f"prefill: {reason_of(e)}"
        async for delta in self._decode(request, key, reply, failure, t0):
            yield delta

    async def decode_prefilled(self, request: dict[str, Any], key: str, reply: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Continue a request whose prefill ran elsewhere (`reply` of the prefill actor, KV under
        `key`). `generate` is prefill + this; tests call it to tamper with the KV in between."""
        async for delta in self._decode(request, key, reply, None, time.monotonic()):
            yield delta

    def _decode(
        self, request: dict[str, Any], key: str, reply: dict[str, Any] | None, failure: str | None, t0: float
    ) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError  # each engine's decode actor moves the KV its own way
