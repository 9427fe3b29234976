"""The run's files written in order on one thread, so the driver's event loop goes on placing
cells while a finished cell's parquet is encoded, redacted and fsynced.

Jobs run one at a time in the order given (a cell's records before its cell.json, a cell's files
before the manifest that lists it), each file still written atomically (analysis/packet.py). The
first job that raised is raised again by the next `submit` or `flush`, so a write error ends the
run as it did when the loop wrote; `close` still runs every queued job, so an error elsewhere in
the run leaves every finished cell's files on disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class FileWriter:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdbench-files")
        self._pending: list[Future[Any]] = []

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self._raise_failed()
        self._pending.append(self._pool.submit(job, *args))

    def _raise_failed(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()

    async def flush(self) -> None:
        """Wait (without blocking the loop) until every job so far has run; raise the first error."""
        pending, self._pending = self._pending, []
        for f in pending:
            await asyncio.wrap_future(f)

    def close(self) -> None:
        """Run what is queued, then stop the thread; errors were raised by `flush` or are lost with the run's own."""
        self._pool.shutdown(wait=True)
