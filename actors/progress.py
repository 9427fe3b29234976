"""A counter that load generators tick and the driver polls, for the progress display."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self) -> None:
        self.done = 0
        self.failed = 0

    def add(self, done: int, failed: int) -> None:
        """A batch of finished requests (load generators report every ~100 ms, not per request)."""
        self.done += done
        self.failed += failed

    def read(self) -> tuple[int, int]:
        return self.done, self.failed
