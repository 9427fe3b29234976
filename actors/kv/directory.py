"""The named directory actor through which a KV sender and its receiver meet.

The sender registers each layer group's object reference under a string key as soon as it is put;
the receiver takes them in order, waiting for the ones not yet there. References travel nested in
a list, so Ray hands them over as references (the directory and then the receiver become
borrowers) instead of resolving them. Taking an entry removes it: once the receiver drops its
reference the object is freed, and nothing piles up over a long sweep. A key the receiver gave up
on is closed, and late registrations for it are refused (their objects are freed at once).

It is found by name (`find_directory`), so the vLLM connector's worker processes, which get no
handle from anyone, reach it the same way the reference engine's actors do.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

import ray

# The namespace cluster/ray_env.py joins; worker processes that ray.init themselves pass it too.
NAMESPACE = "pdbench"
_CLOSED_KEYS_KEPT = 100_000
_SWEEP_EVERY_S = 5.0


@ray.remote(num_cpus=0)
class KVDirectory:
    """`ttl_s`: a key whose groups nobody took within this long after its first registration is
    dropped (its objects freed): a client that went away after the prefill published, a consumer
    whose load never started. The default outlives every receiver's own timeouts."""

    def __init__(self, ttl_s: float = 300.0) -> None:
        self.ttl_s = ttl_s
        self._born: dict[str, float] = {}
        self._last_sweep = time.monotonic()
        self.expired = 0
        # Per engine: wall time its steps spent inside the connector, and steps (see report_engine).
        self._engines: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, dict[int, tuple[Any, list[Any]]]] = {}
        # Per key: how many groups it has, and which were taken; it is forgotten once all were
        # taken and none is waiting (a group put back after a take counts once).
        self._expected: dict[str, int] = {}
        self._taken: dict[str, set[int]] = {}
        self._failed: dict[str, str] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        # Transfer records handed over by receivers that run inside an engine (vLLM's worker),
        # for the actor that owns the request to collect.
        self._reports: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Condition()
        self.registered = 0
        self.taken = 0

    async def register(self, key: str, index: int, groups: int, meta: Any, refs: list[Any]) -> bool:
        """Store group `index` of `groups`; False if the receiver already gave up on `key`."""
        if key in self._closed or key in self._failed:
            return False
        async with self._changed:
            self._sweep()
            self._born.setdefault(key, time.monotonic())
            self._groups.setdefault(key, {})[index] = (meta, refs)
            self._expected.setdefault(key, groups)
            self.registered += 1
            self._changed.notify_all()
        return True

    async def fail(self, key: str, reason: str) -> None:
        """The sender could not publish `key`: wake its receiver with the reason."""
        async with self._changed:
            self._failed[key] = reason
            self._forget(key)
            self._changed.notify_all()

    async def take(self, key: str, index: int, timeout_s: float) -> dict[str, Any]:
        """Remove and return group `index` of `key` and every later one already registered, in
        order ({"groups": [(meta, refs), ...]}), or {"error"} on failure or timeout. Only group
        `index` is waited for: one call hands over a whole published transfer. Once every group
        of a key is taken the key is forgotten."""

        def ready() -> bool:
            return key in self._failed or index in self._groups.get(key, {})

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                return {"error": f"no reference for layer group {index} within {timeout_s:g} s", "timeout": True}
            if key in self._failed:
                return {"error": f"sender failed: {self._failed[key]}"}
            stored = self._groups[key]
            taken = self._taken.setdefault(key, set())
            out = []
            while index in stored:
                out.append(stored.pop(index))
                taken.add(index)
                index += 1
            if not stored and len(taken) >= self._expected[key]:
                self._forget(key)
            self.taken += len(out)
            return {"groups": out}

    async def drop(self, key: str) -> int:
        """Forget `key` (the receiver gave up): release what is stored, refuse what comes later."""
        async with self._changed:
            dropped = len(self._groups.get(key, {}))
            self._forget(key)
            self._failed.pop(key, None)
            self._closed[key] = None
            while len(self._closed) > _CLOSED_KEYS_KEPT:
                self._closed.popitem(last=False)
            return dropped

    async def status(self, key: str) -> dict[str, Any]:
        """Whether a sender finished publishing `key` (all groups registered) or failed, and why."""
        return {
            "failed": self._failed.get(key),
            "expected": self._expected.get(key),
            "registered": len(self._groups.get(key, {})) + len(self._taken.get(key, ())),
        }

    async def report(self, key: str, row: dict[str, Any]) -> None:
        async with self._changed:
            self._reports[key] = row
            self._changed.notify_all()

    async def take_report(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        """The transfer record for `key` (removed), or None if none came within `timeout_s`."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: key in self._reports), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self._reports.pop(key)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_EVERY_S:
            return
        self._last_sweep = now
        for key in [k for k, born in self._born.items() if now - born > self.ttl_s]:
            if self._groups.get(key):
                self.expired += 1
            self._forget(key)
            self._closed[key] = None

    async def report_engine(
        self, engine: str, blocked_s: float, steps: int, loads: int, saves: int, store: dict[str, Any] | None = None
    ) -> None:
        """An engine's connector says how long its steps were blocked so far (cumulative), and how
        its process prepared the object store (registration or prefault time)."""
        self._engines[engine] = {"blocked_s": blocked_s, "steps": steps, "loads": loads, "saves": saves, **(store or {})}

    async def engines(self) -> dict[str, dict[str, Any]]:
        return dict(self._engines)

    def _forget(self, key: str) -> None:
        self._born.pop(key, None)
        self._groups.pop(key, None)
        self._expected.pop(key, None)
        self._taken.pop(key, None)

    async def stats(self) -> dict[str, int]:
        """What the directory holds now (a sweep that leaks shows growing `groups`)."""
        return {
            "keys": len(self._groups.keys() | self._expected.keys() | self._taken.keys()),
            "groups": sum(len(g) for g in self._groups.values()),
            "failed": len(self._failed),
            "reports": len(self._reports),
            "closed": len(self._closed),
            "registered": self.registered,
            "taken": self.taken,
            "expired": self.expired,
        }


def directory_actor(name: str, ttl_s: float = 300.0, **options: Any) -> Any:
    """Create the named directory (or get it if it exists) in the pdbench namespace."""
    return KVDirectory.options(  # type: ignore[attr-defined]  # ray actor class
        name=name, namespace=NAMESPACE, get_if_exists=True, **options
    ).remote(ttl_s)


def find_directory(name: str) -> Any:
    return ray.get_actor(name, namespace=NAMESPACE)
