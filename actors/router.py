"""One entry for several aggregated engine replicas, with EngineActor's streaming `generate`.

A comparison on equal hardware needs it: a disaggregated pair holds two engines, so the
aggregated side gets two replicas with the requests spread over them, behind the same one-hop
entry the load generator already talks to (the decode actor is that hop on the other side).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.backends import HopProbe


@ray.remote(num_cpus=0)
class ReplicaRouter(HopProbe):
    """Sends each request to the replica with the fewest requests in flight; ties go round robin,
    so a closed loop spreads evenly and a replica that falls behind gets less."""

    def __init__(self, replicas: list[Any]):
        if not replicas:
            raise ValueError("ReplicaRouter needs at least one replica")
        self.replicas = list(replicas)
        self.in_flight = [0] * len(replicas)
        self.served = [0] * len(replicas)
        self._next = 0
        self.cell: tuple[str, ...] | None = None  # the cell its requests' mark named last (EngineHost.generate)

    def _pick(self) -> int:
        n = len(self.replicas)
        i = min(((self._next + j) % n for j in range(n)), key=lambda r: self.in_flight[r])
        self._next = (i + 1) % n
        return i

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if (cell := request.get("cell")) is not None and tuple(cell) != self.cell:  # a new cell's first request
            self.reset()
            self.cell = tuple(cell)
        i = self._pick()
        self.in_flight[i] += 1
        self.served[i] += 1
        try:
            async for ref in self.replicas[i].generate.options(num_returns="streaming").remote(request):
                yield await ref
        finally:
            self.in_flight[i] -= 1

    def reset(self) -> None:
        """A new cell on warm replicas starts its counts and its round robin afresh."""
        self.served = [0] * len(self.replicas)
        self._next = 0

    def counts(self) -> list[int]:
        """Requests sent to each replica so far."""
        return list(self.served)
