"""A counter that load generators tick and the driver polls, for the progress display."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self) -> None:
        self.done = 0
        self.failed = 0

    def tick(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1

    def read(self) -> tuple[int, int]:
        return self.done, self.failed
