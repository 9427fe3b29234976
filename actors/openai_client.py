"""Driving any OpenAI-compatible server (`/v1/completions`, streaming) as a load-generator backend.

Prompts go out as token-id lists (the OpenAI API allows `prompt: [int, ...]`), so an external
server sees exactly the prompts a pdbench engine would. Each SSE chunk is one delta; token ids come
from the chunk's `token_ids` (pdbench's endpoint always sends them, vLLM does when asked with
`return_token_ids`); a server that sends text only is counted one token per non-empty chunk, with
id -1, which is how such servers stream.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

import aiohttp
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.backends import Exchange


class TargetSpec(BaseModel):
    """The `target:` section of a config: benchmark this server instead of starting engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(description="server root, e.g. http://127.0.0.1:8000 (the /v1/completions path is added)")
    model: str = Field(description="the `model` field sent with each request")
    vocab_size: int = Field(gt=1, description="prompt token ids are drawn below this (the model's vocabulary size)")
    api_key_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the API key (the key itself never goes in a config)",
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        url = httpx.URL(v)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        if url.userinfo or url.query or url.fragment:
            # A key in a URL would be written into config.yaml and the manifest with it.
            raise ValueError("must not carry credentials, a query or a fragment; put the key in api_key_env")
        return v.rstrip("/")


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


async def _headers_sent(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace_request_ctx.t_sent = time.monotonic()


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


class OpenAIBackend:
    """aiohttp, one keep-alive connection per concurrent stream: of the clients measured side by
    side (benchmarks/http_client.py) the one whose own overhead stays under 1 ms per request at 64
    streams; httpx with httpx-sse added several ms (encode/httpx#3215). Each delta's `t_recv` is
    the moment the read that completed it returned, before any parsing."""

    def __init__(self, target: TargetSpec, api_key: str | None = None):
        self.target = target
        self.url = f"{target.base_url}/v1/completions"
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """Made on first use, inside the event loop that will drive it."""
        if self._session is None:
            sent = aiohttp.TraceConfig()
            sent.on_request_headers_sent.append(_headers_sent)
            self._session = aiohttp.ClientSession(
                trace_configs=[sent],
                # A closed-loop sweep may hold hundreds of streams open at once: no pool limit. The
                # load generator owns the request timeout.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.target.connect_timeout_s),
                auto_decompress=False,
            )
        return self._session

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None) -> AsyncIterator[dict[str, Any]]:
        body = json.dumps(completion_body(self.target, request)).encode()
        session = self._client()
        server: dict[str, Any] | None = None
        ex = exchange if exchange is not None else Exchange()
        t_call = time.monotonic()
        async with session.post(self.url, data=body, headers=self.headers, trace_request_ctx=ex) as resp:
            if ex.t_sent is not None:
                ex.client_send_s = ex.t_sent - t_call
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                yield _delta(finished=True, error=f"HTTP {resp.status}: {text[:500]}")
                return
            buf = b""
            async for data in resp.content.iter_any():
                t = time.monotonic()
                events, buf = sse_events(buf + data)
                for event in events:
                    if event.strip() == "[DONE]":
                        yield _delta(finished=True, server=server)
                        return
                    chunk = json.loads(event)
                    if chunk.get("error"):
                        yield _delta(finished=True, error=f"server error: {json.dumps(chunk['error'])[:500]}")
                        return
                    server = chunk.get("server_timing") or server
                    for choice in chunk.get("choices") or []:
                        ids = choice.get("token_ids")
                        if ids is None:
                            ids = [-1] if choice.get("text") else []
                        if ids:
                            yield _delta(list(ids), t_recv=t)
        yield _delta(finished=True, server=server)

    async def hop_s(self, calls: int) -> float | None:
        """None: an external server has no no-op endpoint to time the client's hop against."""
        return None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
