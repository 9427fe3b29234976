"""Live serving metrics through `ray.util.metrics`, so the Ray dashboard and Prometheus show a run
while it happens (the evidence packet stays the record; these are for watching).

Every series is tagged `run`, `cell`, `role`, taken from the recording actor's name
(`pdbench:<run>:<cell>:<role>`), so any cell runner that names its actors by that rule gets tagged
metrics without passing anything around. The load generator records what the client sees (role
`loadgen`); engine actors record what the engine sees (role `engine`, `prefill`, `decode`, ...),
so a dashboard can put client and engine TTFT side by side. docs/operations.md lists the series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# The same keys as the KV transfer series (actors/kv/accounting.py), so one dashboard filter fits all.
TAG_KEYS = ("run", "cell", "role")

# Seconds; from a fast GPU decode step (ms) to a long prefill queued behind a saturated engine.
LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]

# name → (kind, description); the single list docs/operations.md and the Grafana JSON follow.
SERIES: dict[str, tuple[str, str]] = {
    "pdbench_ttft_seconds": ("histogram", "time to first token, as the recording role sees it"),
    "pdbench_tpot_seconds": ("histogram", "time per output token after the first, per request"),
    "pdbench_e2e_seconds": ("histogram", "request latency from send (or engine receipt) to last token"),
    "pdbench_prompt_tokens": ("counter", "prompt tokens of started requests"),
    "pdbench_output_tokens": ("counter", "output tokens streamed"),
    "pdbench_requests": ("counter", "finished requests, tagged status=ok|error"),
    "pdbench_requests_in_flight": ("gauge", "requests started and not yet finished"),
}


@lru_cache(maxsize=1)
def _series() -> dict[str, Any]:
    """One metric object per name and process (Ray aggregates per tag set)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    out: dict[str, Any] = {}
    for name, (kind, desc) in SERIES.items():
        if kind == "histogram":
            out[name] = Histogram(name, desc, boundaries=LATENCY_BOUNDARIES_S, tag_keys=TAG_KEYS)
        elif kind == "counter":
            keys = (*TAG_KEYS, "status") if name == "pdbench_requests" else TAG_KEYS
            out[name] = Counter(name, desc, tag_keys=keys)
        else:
            out[name] = Gauge(name, desc, tag_keys=TAG_KEYS)
    return out


def tags_from_actor_name(name: str | None, default_role: str) -> dict[str, str]:
    """`pdbench:<run>:<cell>:<role>` → tags; anything else (a test's bare actor) → `unknown`."""
    parts = (name or "").split(":")
    if len(parts) == 4 and parts[0] == "pdbench":
        return {"run": parts[1], "cell": parts[2], "role": parts[3]}
    return {"run": "unknown", "cell": "unknown", "role": default_role}


def current_actor_tags(default_role: str) -> dict[str, str]:
    import ray

    try:
        name = ray.get_runtime_context().get_actor_name()
    except Exception:  # not inside an actor
        name = None
    return tags_from_actor_name(name, default_role)


@dataclass
class RequestMeter:
    """One request's live metrics, on the recording process's own monotonic clock."""

    tags: dict[str, str]
    prompt_tokens: int
    t_start: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        s = _series()
        s["pdbench_requests_in_flight"].set(_in_flight(self.tags, +1), tags=self.tags)
        s["pdbench_prompt_tokens"].inc(self.prompt_tokens, tags=self.tags)

    def tokens_seen(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        s = _series()
        if self.t_first is None:
            self.t_first = now
            s["pdbench_ttft_seconds"].observe(now - self.t_start, tags=self.tags)
        self.t_last = now
        self.tokens += n
        s["pdbench_output_tokens"].inc(n, tags=self.tags)

    def finish(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        s = _series()
        s["pdbench_requests_in_flight"].set(_in_flight(self.tags, -1), tags=self.tags)
        s["pdbench_requests"].inc(1, tags={**self.tags, "status": "ok" if ok else "error"})
        if ok and self.t_last is not None:
            s["pdbench_e2e_seconds"].observe(self.t_last - self.t_start, tags=self.tags)
            if self.tokens >= 2 and self.t_first is not None:
                s["pdbench_tpot_seconds"].observe((self.t_last - self.t_first) / (self.tokens - 1), tags=self.tags)


class BatchedFeed:
    """The load generator's live view, recorded every `interval_s` rather than per request: Ray
    metric calls and the progress counter's actor call would otherwise sit on the send path (at
    1,000 req/s they were over half of the load generator's time). Requests are counted when they
    start and recorded when they finish; `flush` hands everything since the last one over."""

    def __init__(self, tags: dict[str, str], progress: Any = None, interval_s: float = 0.1):
        self.tags = tags
        self.progress = progress
        self.interval_s = interval_s
        self._started: list[int] = []  # prompt tokens of each started request
        self._finished: list[tuple[bool, int, float | None, float | None, float | None]] = []
        self._task: asyncio.Task | None = None

    def started(self, prompt_tokens: int) -> None:
        self._started.append(prompt_tokens)

    def finished(self, ok: bool, tokens: int, ttft_s: float | None, tpot_s: float | None, e2e_s: float | None) -> None:
        self._finished.append((ok, tokens, ttft_s, tpot_s, e2e_s))

    async def __aenter__(self) -> BatchedFeed:
        self._task = asyncio.create_task(self._every())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
        self.flush()

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.flush()

    def flush(self) -> None:
        started, self._started = self._started, []
        finished, self._finished = self._finished, []
        if not started and not finished:
            return
        s = _series()
        t = self.tags
        if started:
            s["pdbench_prompt_tokens"].inc(sum(started), tags=t)
        s["pdbench_requests_in_flight"].set(_in_flight(t, len(started) - len(finished)), tags=t)
        n_ok = sum(1 for f in finished if f[0])
        tokens = sum(f[1] for f in finished)
        if tokens:
            s["pdbench_output_tokens"].inc(tokens, tags=t)
        for status, n in (("ok", n_ok), ("error", len(finished) - n_ok)):
            if n:
                s["pdbench_requests"].inc(n, tags={**t, "status": status})
        for ok, _, ttft, tpot, e2e in finished:
            for name, v in (("pdbench_ttft_seconds", ttft), ("pdbench_tpot_seconds", tpot), ("pdbench_e2e_seconds", e2e)):
                if ok and v is not None:
                    s[name].observe(v, tags=t)
        if self.progress is not None and finished:
            self.progress.add.remote(len(finished), len(finished) - n_ok)


_IN_FLIGHT: dict[tuple[str, ...], int] = {}


def _in_flight(tags: dict[str, str], step: int) -> int:
    key = tuple(tags[k] for k in TAG_KEYS)
    _IN_FLIGHT[key] = _IN_FLIGHT.get(key, 0) + step
    return _IN_FLIGHT[key]


def cell_tags(run_id: str, cell_id: str, role: str) -> dict[str, str]:
    """The tags of a warm actor serving another cell than the one in its name (cluster/cells/engine_pool.py)."""
    return {"run": run_id, "cell": cell_id, "role": role}


async def metered(
    stream: AsyncIterator[dict[str, Any]], role: str, prompt_tokens: int, tags: dict[str, str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Pass an entry actor's TokenDelta dicts through, recording them (role from the actor name,
    unless `tags` say which cell a warm actor serves now).

    Each delta is handed on first and recorded after, with the time it was ready: a Ray metric
    call never sits between the engine and the client (it was part of the harness's share of TTFT).
    """
    t_start = time.monotonic()
    tags = tags or current_actor_tags(role)
    meter: RequestMeter | None = None
    ok = False
    try:
        async for delta in stream:
            t = time.monotonic()
            ok = delta["finished"] and delta["error"] is None
            yield delta
            if meter is None:
                meter = RequestMeter(tags, prompt_tokens, t_start=t_start)
            meter.tokens_seen(len(delta["token_ids"]), t)
    finally:
        (meter or RequestMeter(tags, prompt_tokens, t_start=t_start)).finish(ok)
