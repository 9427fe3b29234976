"""Driving any OpenAI-compatible server (`/v1/completions`, streaming) as a load-generator backend.

Prompts go out as token-id lists (the OpenAI API allows `prompt: [int, ...]`), so an external
server sees exactly the prompts a pdbench engine would. Each SSE chunk is one delta; token ids come
from the chunk's `token_ids` (pdbench's endpoint always sends them, vLLM does when asked with
`return_token_ids`); a server that sends text only is counted one token per non-empty chunk, with
id -1, which is how such servers stream.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h11
import httpx

from actors.backends import Exchange
from actors.target import TargetSpec


def completion_body(target: TargetSpec, request: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": target.model,
        "prompt": list(request["prompt_token_ids"]),
        "max_tokens": int(request["max_tokens"]),
        # Greedy, exactly max_tokens: what pdbench's engines do, so runs stay comparable.
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def _delta(
    token_ids: list[int] | None = None, finished: bool = False, error: str | None = None, server: Any = None, t_recv: float | None = None
) -> dict:
    return {
        "token_ids": token_ids or [],
        "token_s": [],
        "finished": finished,
        "error": error,
        "server": server,
        "t_recv": time.monotonic() if t_recv is None else t_recv,
    }


def sse_events(buf: bytes) -> tuple[list[str], bytes]:
    """Complete SSE events' `data` in `buf`, and the incomplete rest (kept for the next read).
    One split per read, never per byte; `data:` lines of one event are joined with newlines."""
    if b"\r" in buf:
        buf = buf.replace(b"\r\n", b"\n")
    *events, rest = buf.split(b"\n\n")
    out = []
    for ev in events:
        data = [line[5:].lstrip(b" ") for line in ev.split(b"\n") if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data).decode())
    return out, rest


class _StampedReads(asyncio.Protocol):
    """A connection whose every read is stamped in `data_received`, while the event loop is still
    dispatching I/O and before any task runs: a stream whose bytes arrive while the client parses
    another one's are stamped when they came, not when the client got round to them."""

    def __init__(self) -> None:
        self.reads: deque[tuple[float, bytes]] = deque()
        self.closed: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def data_received(self, data: bytes) -> None:
        self.reads.append((time.monotonic(), data))
        self._wake()

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionResetError("server closed the connection")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> tuple[float, bytes]:
        while not self.reads:
            if self.closed is not None:
                return time.monotonic(), b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.reads.popleft()


class ServerSilent(Exception):
    """The server sent nothing for target.read_timeout_s within one request."""


@dataclass
class _Conn:
    transport: asyncio.Transport
    proto: _StampedReads
    http: h11.Connection


class OpenAIBackend:
    """HTTP/1.1 over keep-alive connections, one per concurrent stream: h11 (httpx's own protocol
    engine) speaks HTTP, an asyncio Protocol stamps the reads. Measured side by side
    (benchmarks/http_client.py) against aiohttp, httpx + httpx-sse (pdbench's client before, which
    added several ms at 4 streams and hundreds at 64: encode/httpx#3215) and plain asyncio streams:
    stamping in the protocol is what keeps bursts of chunks from many streams from being stamped
    late. `t_sent` is the moment the request is handed to the socket, after the client built it;
    that build time is reported as the client's own (`client_send_s`)."""

    def __init__(self, target: TargetSpec, api_key: str | None = None):
        self.target = target
        url = httpx.URL(target.base_url)
        self.host, self.tls = url.host, url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.path = f"{url.path.rstrip('/')}/v1/completions"
        self.headers = [("Host", url.netloc.decode()), ("Content-Type", "application/json"), ("Accept", "text/event-stream")]
        if api_key:
            self.headers.append(("Authorization", f"Bearer {api_key}"))
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        while self._idle:
            c = self._idle.pop()
            if c.proto.closed is None:
                return c
        loop = asyncio.get_running_loop()
        ssl_ctx = ssl.create_default_context() if self.tls else None
        transport, proto = await asyncio.wait_for(
            loop.create_connection(_StampedReads, self.host, self.port, ssl=ssl_ctx), self.target.connect_timeout_s
        )
        return _Conn(transport, proto, h11.Connection(h11.CLIENT))

    async def _events(self, c: _Conn) -> AsyncIterator[tuple[float, Any]]:
        """h11 events with the stamp of the read that completed each."""
        t = time.monotonic()
        while True:
            event = c.http.next_event()
            if event is h11.NEED_DATA:
                try:
                    t, data = await asyncio.wait_for(c.proto.read(), self.target.read_timeout_s)
                except asyncio.TimeoutError:
                    raise ServerSilent(
                        f"no reply from {self.target.base_url} for {self.target.read_timeout_s:g} s (target.read_timeout_s)"
                    ) from None
                c.http.receive_data(data)
                continue
            yield t, event
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None) -> AsyncIterator[dict[str, Any]]:
        t_call = time.monotonic()
        body = json.dumps(completion_body(self.target, request)).encode()
        c = await self._connect()
        wire = c.http.send(h11.Request(method="POST", target=self.path, headers=[*self.headers, ("Content-Length", str(len(body)))]))
        wire += c.http.send(h11.Data(data=body)) + c.http.send(h11.EndOfMessage())
        ex = exchange if exchange is not None else Exchange()
        t_built = time.monotonic()
        await ex.ready()
        ex.t_sent = time.monotonic()
        ex.client_send_s = t_built - t_call
        c.transport.write(wire)
        status, error, buf, server, finished = 0, b"", b"", None, False
        try:
            async for t, event in self._events(c):
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data) and status != 200:
                    error += bytes(event.data)
                elif isinstance(event, h11.Data) and not finished:
                    events, buf = sse_events(buf + bytes(event.data))
                    for data in events:
                        if data.strip() == "[DONE]":
                            finished = True
                            break
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            yield _delta(finished=True, error=f"server error: {json.dumps(chunk['error'])[:500]}")
                            c.transport.close()
                            return
                        server = chunk.get("server_timing") or server
                        for choice in chunk.get("choices") or []:
                            ids = choice.get("token_ids")
                            if ids is None:
                                ids = [-1] if choice.get("text") else []
                            if ids:
                                yield _delta(list(ids), t_recv=t)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("server closed the connection mid-response")
        except ServerSilent as e:  # the request fails, named; the run goes on
            c.transport.close()
            yield _delta(finished=True, error=str(e))
            return
        except BaseException:  # cancelled (timeout) or broken mid-response: the connection cannot be reused
            c.transport.close()
            raise
        self._release(c)
        if status != 200:
            yield _delta(finished=True, error=f"HTTP {status}: {error.decode(errors='replace')[:500]}")
            return
        yield _delta(finished=True, server=server)

    def _release(self, c: _Conn) -> None:
        """Back to the pool when the server keeps the connection open for another request."""
        if c.http.our_state is h11.DONE and c.http.their_state is h11.DONE and c.proto.closed is None:
            c.http.start_next_cycle()
            self._idle.append(c)
        else:
            c.transport.close()

    async def hop_s(self, calls: int) -> float | None:
        """None: an external server has no no-op endpoint to time the client's hop against."""
        return None

    async def aclose(self) -> None:
        for c in self._idle:
            c.transport.close()
        self._idle.clear()
