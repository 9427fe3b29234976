"""The load-generator actor: sends a cell's requests on schedule and timestamps what comes back.

Runs beside its cell's entry actor (0 CPUs: it waits on I/O; LLMPerf's one-CPU-per-client actors
could not even be scheduled on small clusters). Every request carries its intended send time and
its actual send time, so a late client shows up as queue delay instead of as a faster server.
It talks to a backend (actors/backends.py): a pdbench entry actor or an OpenAI-compatible HTTP
server, through one streaming interface, and publishes what it sees as live metrics (role
`loadgen`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from actors.backends import Backend, open_backend
from actors.metrics import RequestMeter, current_actor_tags
from workloads.requests import RequestSpec


async def _send(backend: Backend, tags: dict[str, str], spec: RequestSpec, t0: float, t_scheduled: float, timeout_s: float | None) -> dict:
    rec: dict[str, Any] = {
        "request_id": spec.request_id,
        "warmup": spec.warmup,
        "input_tokens": len(spec.prompt_token_ids),
        "max_tokens": spec.max_tokens,
        "t_scheduled": t_scheduled,
        "t_sent": time.monotonic() - t0,
        "t_tokens": [],
        "output_token_ids": [],
        "ok": False,
        "error": None,
        "server": None,
    }
    req = {"request_id": spec.request_id, "prompt_token_ids": list(spec.prompt_token_ids), "max_tokens": spec.max_tokens}
    meter = RequestMeter(tags, len(spec.prompt_token_ids))

    async def consume() -> None:
        async for delta in backend.stream(req):
            now = time.monotonic() - t0
            meter.tokens_seen(len(delta["token_ids"]))
            rec["output_token_ids"].extend(delta["token_ids"])
            rec["t_tokens"].extend([now] * len(delta["token_ids"]))
            rec.setdefault("server_token_s", []).extend(delta["token_s"])
            if delta["finished"]:
                rec["error"] = delta["error"]
                rec["ok"] = delta["error"] is None
                rec["server"] = delta["server"]

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except asyncio.TimeoutError:
        rec["error"] = f"timeout after {timeout_s} s"
    except Exception as e:  # actor died, engine raised: the request fails, the cell goes on
        rec["error"] = f"{type(e).__name__}: {e}"
    meter.finish(rec["ok"])
    return rec


@ray.remote(num_cpus=0)
class LoadGenerator:
    async def run(
        self,
        entry: Any,
        requests: list[RequestSpec],
        concurrency: int,
        timeout_s: float | None = None,
        progress: Any = None,
        api_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Warm-up requests first (closed loop, excluded later), then the measured phase.

        `entry` is an entry actor handle or a TargetSpec (HTTP server; `api_key` authenticates).
        `concurrency` is the number of closed-loop users; requests with `t_scheduled` set are
        sent open loop at t0 + t_scheduled whatever the server is doing.
        """
        backend = open_backend(entry, api_key)
        self._tags = current_actor_tags("loadgen")
        warm = [r for r in requests if r.warmup]
        measured = [r for r in requests if not r.warmup]
        try:
            records = await self._closed(backend, warm, concurrency, timeout_s, progress)
            if measured and measured[0].t_scheduled is not None:
                records += await self._open(backend, measured, timeout_s, progress)
            else:
                records += await self._closed(backend, measured, concurrency, timeout_s, progress)
        finally:
            await backend.aclose()
        return records

    async def _closed(self, backend, reqs, concurrency, timeout_s, progress) -> list[dict]:
        t0 = time.monotonic()
        todo = list(reversed(reqs))
        out: list[dict] = []

        async def user() -> None:
            while todo:
                spec = todo.pop()
                # A closed-loop user is ready the moment it picks the request up.
                rec = await _send(backend, self._tags, spec, t0, time.monotonic() - t0, timeout_s)
                out.append(rec)
                if progress is not None:
                    progress.tick.remote(rec["ok"])

        await asyncio.gather(*(user() for _ in range(max(1, min(concurrency, len(reqs) or 1)))))
        return out

    async def _open(self, backend, reqs, timeout_s, progress) -> list[dict]:
        t0 = time.monotonic()

        async def at(spec: RequestSpec) -> dict:
            # asyncio may wake a little early (clock resolution): never send before the schedule.
            while (delay := t0 + spec.t_scheduled - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            rec = await _send(backend, self._tags, spec, t0, spec.t_scheduled, timeout_s)
            if progress is not None:
                progress.tick.remote(rec["ok"])
            return rec

        return list(await asyncio.gather(*(at(s) for s in reqs)))

