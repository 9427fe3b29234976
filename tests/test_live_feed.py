"""The load generator's live view is batched: one progress call per interval, not one per request."""

import asyncio
from types import SimpleNamespace

from actors import metrics
from actors.metrics import BatchedFeed


class Progress:
    def __init__(self):
        self.calls = []
        self.add = SimpleNamespace(remote=lambda done, failed: self.calls.append((done, failed)))


def test_feed_batches_progress_and_metrics(ray_local):
    progress = Progress()
    tags = {"run": "t", "cell": "feed", "role": "loadgen"}

    async def go():
        async with BatchedFeed(tags, progress, interval_s=0.05) as feed:
            for i in range(300):  # a burst of 300 requests within one interval
                feed.started(10)
                feed.finished(i % 10 != 0, 4, 0.01, 0.002, 0.02)
            assert progress.calls == []  # nothing recorded on the send path
            await asyncio.sleep(0.12)
            assert progress.calls == [(300, 30)]
            feed.started(10)
            feed.finished(True, 4, 0.01, 0.002, 0.02)
        # Leaving the block flushes what is left.
        assert progress.calls == [(300, 30), (1, 0)]

    asyncio.run(go())
    assert metrics._IN_FLIGHT[("t", "feed", "loadgen")] == 0


def test_the_run_counter_reads_totals_and_cells_in_one_call(ray_local):
    from actors.progress import CellCounter, ProgressCounter

    counter = ProgressCounter.remote()
    ray_local.get([CellCounter(counter, "a").add.remote(3, 1), CellCounter(counter, "b").add.remote(2, 0), counter.add.remote(1, 0)])
    assert ray_local.get(counter.snapshot.remote()) == (6, 1, {"a": 3, "b": 2})
    ray_local.kill(counter)
