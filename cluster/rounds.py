"""The round loop: a track's cells run in rounds, the first its grid, each further round what the
track's `next_cells` proposes from the finished cells' metrics (E2's rate search). Cells of a
round run concurrently, up to `max_concurrent_cells`; the progress display is fed while they run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.progress import CellCounter, ProgressCounter
from analysis.metrics import cell_metrics, workload_of
from analysis.packet import CELL_REQUESTS, read_rows
from analysis.records import measured
from analysis.schemas import read_requests
from cluster.cells.engine_pool import grouped
from cluster.config import ExperimentConfig
from cluster.planning import cell_engine, for_target
from workloads.tracks import CellOutcome, CellPlan, Track

PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class CellState:
    cell_id: str
    state: str  # waiting, running, ok, failed
    requests_done: int
    requests_total: int


@dataclass(frozen=True)
class RunProgress:
    """What the progress display shows; totals grow when an adaptive track adds a round."""

    cells_done: int
    cells_total: int
    requests_done: int
    requests_total: int
    cells: tuple[CellState, ...] = ()


def outcome(cfg: ExperimentConfig, plan: CellPlan, cell_dir: Path, meta: dict[str, Any]) -> CellOutcome:
    """A finished cell as a track's `next_cells` sees it."""
    metrics = None
    if meta.get("status") == "ok":
        rows = measured(read_rows(cell_dir / CELL_REQUESTS, read_requests))
        metrics = cell_metrics(rows, cfg.slo, *workload_of(meta)) if not rows.empty else None
    return CellOutcome(plan.cell_id, dict(plan.labels), meta.get("status") == "ok", meta.get("error"), metrics)


@dataclass
class Cells:
    """How the loop reaches the cells: where they live, a finished one found, a new one run."""

    dir: Callable[[CellPlan], Path]
    finished: Callable[[CellPlan], dict[str, Any] | None]
    run: Callable[[CellPlan, Any], Awaitable[dict[str, Any]]]  # (plan, its progress counter) → cell.json
    ran: Callable[[dict[str, dict[str, Any]]], None]  # after a cell ran: every cell's meta so far
    flush: Callable[[], Awaitable[None]]  # until every finished cell's files are on disk


class Rounds:
    def __init__(self, cfg: ExperimentConfig, track: Track[Any], params: Any, concurrency: int, cells: Cells):
        self.cfg, self.track, self.params, self.cells = cfg, track, params, cells
        self.sem = asyncio.Semaphore(concurrency)
        self.plans: list[CellPlan] = []  # every round's cells so far
        self.metas: dict[str, dict[str, Any]] = {}
        self.running: set[str] = set()
        self.done = 0
        self.resumed_requests = 0
        self.adaptive = type(track).next_cells is not Track.next_cells

    async def run(self, first: list[CellPlan], on_progress: Callable[[RunProgress], None] | None) -> list[dict[str, Any]]:
        progress = ProgressCounter.remote()  # type: ignore[attr-defined]  # a Ray actor class
        outcomes: dict[str, CellOutcome] = {}
        round_plans = list(first)
        while True:  # a round; the first may be empty when a track is adaptive only
            self.plans += round_plans
            # Cells of one engine configuration one after another: each can take the last one's warm engine.
            by_engine = grouped(round_plans, lambda p: cell_engine(self.cfg, p).model_dump_json())
            tasks = [asyncio.ensure_future(self._one(p, progress)) for p in by_engine]
            while tasks and not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=PROGRESS_EVERY_S if on_progress is not None else None)  # no display: no polling
                if on_progress is not None:
                    on_progress(await self._progress(progress))
            if self.adaptive:  # outcomes read the cells' files
                await self.cells.flush()
            for p in round_plans if self.adaptive else ():  # a fixed grid reads no outcome: no metrics to compute
                outcomes[p.cell_id] = outcome(self.cfg, p, self.cells.dir(p), self.metas[p.cell_id])
            known = {p.cell_id for p in self.plans}
            proposed = for_target(self.cfg, self.track.next_cells(self.cfg.workload, self.params, outcomes))
            round_plans = list({p.cell_id: p for p in proposed if p.cell_id not in known}.values())
            if not round_plans:
                break
        ray.kill(progress)
        return [self.metas[p.cell_id] for p in self.plans]

    async def _one(self, plan: CellPlan, progress: Any) -> dict[str, Any]:
        meta = self.cells.finished(plan)
        if meta is not None:
            self.resumed_requests += plan.num_requests
            self.metas[plan.cell_id] = meta
        else:
            async with self.sem:
                self.running.add(plan.cell_id)
                meta = await self.cells.run(plan, CellCounter(progress, plan.cell_id))
                self.running.discard(plan.cell_id)
            self.metas[plan.cell_id] = meta
            self.cells.ran(self.metas)
        self.done += 1
        return meta

    async def _progress(self, progress: Any) -> RunProgress:
        sent, _failed, per_cell = await progress.snapshot.remote()

        def state(p: CellPlan) -> CellState:
            if p.cell_id in self.metas:
                done = per_cell.get(p.cell_id, p.num_requests)
                return CellState(p.cell_id, self.metas[p.cell_id].get("status", "failed"), done, p.num_requests)
            return CellState(p.cell_id, "running" if p.cell_id in self.running else "waiting", per_cell.get(p.cell_id, 0), p.num_requests)

        total = sum(p.num_requests for p in self.plans)
        return RunProgress(self.done, len(self.plans), sent + self.resumed_requests, total, tuple(state(p) for p in self.plans))
