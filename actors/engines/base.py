"""One async interface for every engine, so actors and load generators never special-case one.

Engine-side times are durations measured inside the engine's process (never subtracted from
another process's clock): token times are seconds since the engine received the request.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


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
    finish_reason: str | None = None  # the engine's own word, where it gives one (vLLM: "length", "error", ...)

    def merge(self, later: TokenDelta) -> TokenDelta:
        return TokenDelta(
            token_ids=self.token_ids + later.token_ids,
            token_s=self.token_s + later.token_s,
            finished=later.finished,
            error=later.error or self.error,
            server=later.server or self.server,
            finish_reason=later.finish_reason or self.finish_reason,
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
    # True where the weights are random (the tiny model, vLLM load_format="dummy", the simulator):
    # latency and memory are real, answers (E4 accuracy, E6 passkeys) are meaningless.
    random_weights: bool = False


@dataclass(frozen=True)
class MemoryReport:
    """Where one engine's memory went, measured inside its own process. Bytes; None = not measured.

    `EngineAdapter.memory()` returns these fields as a dict (`dataclasses.asdict`); an adapter
    may add keys of its own (vLLM: its profiler's raw numbers) beside them.

    - `weights_bytes`: model parameters and buffers as loaded.
    - `kv_cache_bytes`: KV cache held at its peak. vLLM: the preallocated block pool; reference:
      the per-sequence K/V buffers at their largest total.
    - `activation_peak_bytes`: transient memory of forward passes at their peak (activations,
      attention scores, temporary batch caches); vLLM: the profiler's torch peak increase.
    - `other_bytes`: the rest of the process's peak footprint: CUDA context, cuBLAS/NCCL
      workspaces, allocator caching, CUDA graphs, the Python/torch/Ray runtime.
    - `total_bytes`: the peak footprint, the sum of the four above.
    - `source`: how these were measured, in words (shown in the E5 report).
    - `measured`: False where nothing was measured (the simulated engine): never plot those.
    - `device`: "cpu", "cuda:0", ...; `device_total_bytes`: that device's memory (host RAM on CPU).
    - `kv_cache_tokens`: tokens the KV pool holds where the engine has a fixed pool (vLLM).
    - `detail`: the raw readings the numbers were derived from.
    """

    source: str
    measured: bool
    device: str
    weights_bytes: int | None = None
    kv_cache_bytes: int | None = None
    activation_peak_bytes: int | None = None
    other_bytes: int | None = None
    total_bytes: int | None = None
    device_total_bytes: int | None = None
    kv_cache_tokens: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class EngineAdapter(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> EngineInfo: ...

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]: ...

    @abc.abstractmethod
    async def memory(self) -> dict[str, Any]:
        """Memory decomposition so far (peaks since the engine finished loading): a dict with the
        fields of MemoryReport, at least `source`, `measured`, `device`, `weights_bytes`,
        `kv_cache_bytes`, `activation_peak_bytes`, `other_bytes`, `total_bytes`."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Between two cells on one warm engine (cluster/cells/engine_pool.py): forget what the last cell
        left that could change the next one's result (a prefix cache) and open new peak windows
        for `memory()`, so a reused engine measures as a fresh one would. Called with no request
        in flight."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
