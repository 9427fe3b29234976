"""One async interface for every engine, so actors and load generators never special-case one.

Engine-side times are durations measured inside the engine's process (never subtracted from
another process's clock): token times are seconds since the engine received the request.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class TokenDelta:
    """New tokens since the last delta; the final one carries the engine-side breakdown."""

    token_ids: list[int] = field(default_factory=list)
    token_s: list[float] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    server: dict[str, Any] | None = None

    def merge(self, later: "TokenDelta") -> "TokenDelta":
        return TokenDelta(
            token_ids=self.token_ids + later.token_ids,
            token_s=self.token_s + later.token_s,
            finished=later.finished,
            error=later.error or self.error,
            server=later.server or self.server,
        )


@dataclass(frozen=True)
class EngineInfo:
    """What the manifest needs to know about a started engine."""

    engine: str
    model: str
    architecture: dict[str, Any]
    vocab_size: int
    kv_bytes_per_token: int
    device: str
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)


class EngineAdapter(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> EngineInfo: ...

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
