"""What the load generator sends requests to: one streaming interface over any server.

A backend turns a request (`request_id`, `prompt_token_ids`, `max_tokens`) into a stream of
TokenDelta dicts (`token_ids`, `token_s`, `finished`, `error`, `server`). The load generator
timestamps each delta as it arrives and knows nothing else about the server, so the same tracks
measure a pdbench entry actor (Ray streaming generator) or any OpenAI-compatible HTTP server.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol


class Backend(Protocol):
    def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class ActorBackend:
    """An entry actor exposing the streaming `generate(request)` of EngineActor."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for ref in self.handle.generate.options(num_returns="streaming").remote(request):
            yield await ref

    async def aclose(self) -> None:
        return None


def open_backend(entry: Any, api_key: str | None = None) -> Backend:
    """An actor handle → ActorBackend; a TargetSpec → OpenAIBackend (HTTP)."""
    from actors.openai_client import OpenAIBackend, TargetSpec

    if isinstance(entry, TargetSpec):
        return OpenAIBackend(entry, api_key)
    return ActorBackend(entry)
