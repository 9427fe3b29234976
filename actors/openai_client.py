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

import httpx
from httpx_sse import aconnect_sse
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


class OpenAIBackend:
    def __init__(self, target: TargetSpec, api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.target = target
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=target.base_url,
            headers=headers,
            # The load generator owns the request timeout; a closed-loop sweep may hold hundreds of
            # streams open at once, so the pool is unbounded.
            timeout=httpx.Timeout(None, connect=target.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            transport=transport,
        )

    async def stream(self, request: dict[str, Any], exchange: Exchange | None = None) -> AsyncIterator[dict[str, Any]]:
        body = completion_body(self.target, request)
        server: dict[str, Any] | None = None
        if exchange is not None:
            exchange.t_sent = time.monotonic()
        async with aconnect_sse(self.client, "POST", "/v1/completions", json=body) as source:
            resp = source.response
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                yield _delta(finished=True, error=f"HTTP {resp.status_code}: {text[:500]}")
                return
            async for event in source.aiter_sse():
                if event.data.strip() == "[DONE]":
                    break
                chunk = json.loads(event.data)
                if chunk.get("error"):
                    yield _delta(finished=True, error=f"server error: {json.dumps(chunk['error'])[:500]}")
                    return
                server = chunk.get("server_timing") or server
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids")
                    if ids is None:
                        ids = [-1] if choice.get("text") else []
                    if ids:
                        yield _delta(list(ids), t_recv=time.monotonic())
        yield _delta(finished=True, server=server)

    async def hop_s(self, calls: int) -> float | None:
        """None: an external server has no no-op endpoint to time the client's hop against."""
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
