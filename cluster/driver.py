"""The driver: expand a track into cells, run them on placement groups, persist, summarise.

Each finished cell is written atomically under `cells/<cell_id>/` by the run's file writer, in
order, while the loop goes on (cluster/cell_record.py, cluster/file_writer.py), so a killed run
loses at most the cells in flight and those queued to be written; `--resume`
(RunOptions.resume, cluster/resume.py) runs only the cells that have no finished result with the
same cell config hash. The run-level files (cluster/run_files.py, manifest.json, reports) are
rebuilt from the cell files, so they never hold a cell twice.

The driver wires the steps together, data flowing one way: planning (cluster/planning.py) →
rounds of cells (cluster/rounds.py) → the packet. None of those modules imports this one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from filelock import FileLock

from actors.telemetry import TelemetrySampler
from analysis.packet import load_packet, write_json, write_yaml
from analysis.report import write_reports
from cluster import ray_env, resume
from cluster.cell_record import CellTables, run_cell
from cluster.cells import MODES, CellContext
from cluster.cells.engine_pool import EnginePool, pool_depth
from cluster.config import ConfigError, ExperimentConfig, config_hash, to_yaml
from cluster.file_writer import FileWriter
from cluster.hostload import HostLoadSampler
from cluster.planning import cell_concurrency, cell_config, cell_engine, cell_hash, plan_cells, preflight
from cluster.rounds import Cells, Rounds, RunProgress
from cluster.run_files import assemble, save_telemetry
from cluster.run_manifest import RunFacts, now, run_manifest
from cluster.storage import Destination
from workloads.tracks import CellPlan, get_track

TELEMETRY_INTERVAL_S = 1.0
MANIFEST_EVERY_S = 2.0
# Of a core: a 1,000-cell manifest costs tens of ms to write, more on a starved box; the driver's
# whole overhead is meant to stay under 2% of wall (benchmarks/scale.py), so this is a tenth of that.
# The running manifest is a live view: resume reads the cells' own files (cluster/resume.py).
MANIFEST_BUDGET = 0.002


@dataclass
class RunOptions:
    out_dir: str | Path = "runs"  # a folder or a pyarrow.fs URI (cluster/storage.py)
    address: str | None = None
    progress: bool = True
    resume: Path | None = None


class Driver:
    def __init__(self, cfg: ExperimentConfig, opts: RunOptions):
        self.cfg = cfg
        self.opts = opts
        self.track = get_track(cfg.track)
        self.params = self.track.params_model.model_validate(cfg.params)
        self.plans = plan_cells(cfg)
        preflight(cfg, self.plans)  # before anything is made or shown: what can never run is refused
        self.hash = config_hash(cfg)
        self.dest = Destination(opts.out_dir)
        if opts.resume is None:
            self.dest.check_writable()
            self.run_id = f"{cfg.track}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{self.hash[:8]}-{secrets.token_hex(2)}"
            self.run_dir = self.dest.local_dir(self.run_id)
            started_at, resumed_at = now(), []
        else:
            self.run_dir = Path(opts.resume)
            prior = resume.adopt(self.run_dir, cfg.track, self.hash)
            self.run_id, started_at, resumed_at = prior.run_id, prior.started_at, [*prior.resumed_at, now()]
        self.facts = RunFacts(cfg, self.run_id, self.hash, started_at, resumed_at)
        # Where the packet ends up: the URI for shared storage, else the folder itself.
        self.location = self.dest.location(self.run_id) if self.dest.remote else str(self.run_dir)
        self._manifest_at = 0.0
        self._manifest_cost_s = 0.0  # CPU of the last running manifest's write (on the writer's thread)
        self.pool: EnginePool | None = None  # warm engines, made in _run_all (cluster/cells/engine_pool.py)
        self.host: HostLoadSampler | None = None  # the host's load for every cell, made in _run_all
        self.files = FileWriter()  # the cells' files and the running manifest, written in order off the loop
        self.tables: dict[str, CellTables] = {}  # the rows of the cells written, for the run-level files

    def context(self, plan: CellPlan, progress: Any = None) -> CellContext:
        return CellContext(
            run_id=self.run_id,
            cfg=cell_config(self.cfg, plan),
            plan=plan,
            engine=cell_engine(self.cfg, plan),
            seed=self.cfg.seed + plan.seed_offset,
            progress=progress,
            pool=self.pool,
        )

    def _cell_dir(self, plan: CellPlan) -> Path:
        return self.run_dir / "cells" / plan.cell_id

    async def _run_cell(self, plan: CellPlan, progress: Any) -> dict[str, Any]:
        assert self.host is not None  # made with the loop
        ctx, cell_dir = self.context(plan, progress), self._cell_dir(plan)
        meta = await run_cell(ctx, cell_dir, cell_hash(self.cfg, plan), self.host, self.files, self.tables)
        self.files.submit(self.dest.publish_cell, self.run_dir, plan.cell_id)
        return meta

    def _ran(self, metas: dict[str, Any]) -> None:
        """After a cell ran: the running manifest, rewritten at most every MANIFEST_EVERY_S, or less
        often where its last write cost more than MANIFEST_BUDGET of a core over that time (it lists
        every cell: once per cell made a 1,000-cell sweep quadratic; resume reads the cell files)."""
        if time.monotonic() - self._manifest_at >= max(MANIFEST_EVERY_S, self._manifest_cost_s / MANIFEST_BUDGET):
            self._manifest_at = time.monotonic()
            # Built and written by the file writer, after the files of every cell it lists.
            self.files.submit(self._write_running_manifest, dict(metas), self._serving_modes())

    def _write_running_manifest(self, cells: dict[str, Any], serving_modes: list[str]) -> None:
        t = time.thread_time()
        self._write_manifest(cells, "running", serving_modes)
        self._manifest_cost_s = time.thread_time() - t

    def _serving_modes(self) -> list[str]:
        return sorted({p.serving_mode for p in self.plans})

    def _write_manifest(self, cells: dict[str, Any], status: str, serving_modes: list[str]) -> None:
        write_json(self.run_dir / "manifest.json", run_manifest(self.facts, serving_modes, cells, status))

    async def _run_all(self, on_progress: Callable[[RunProgress], None] | None) -> list[dict[str, Any]]:
        cells = Cells(
            dir=self._cell_dir,
            finished=lambda p: resume.finished(self._cell_dir(p), cell_hash(self.cfg, p)),
            run=self._run_cell,
            # Only a cell that ran marks the run running: a resume with nothing to redo leaves a
            # complete manifest complete until finalize rewrites it.
            ran=self._ran,
            flush=self.files.flush,
        )
        concurrency = self.facts.concurrency or 1
        # With warm engines for every cell, each holds the next cell's call queued behind the running one.
        depth = pool_depth(not self.cfg.fresh_engines, self._serving_modes())
        rounds = Rounds(self.cfg, self.track, self.params, concurrency * depth, cells)
        first, self.plans = self.plans, rounds.plans  # the manifest's serving modes follow the rounds
        samplers = ray_env.actor_on_each_node(TelemetrySampler, TELEMETRY_INTERVAL_S)
        await asyncio.gather(*(s.start.remote() for s in samplers))
        self.pool = EnginePool(reuse=not self.cfg.fresh_engines, capacity=concurrency, depth=depth)
        self.host = HostLoadSampler()
        try:
            metas = await rounds.run(first, on_progress)
            await self.files.flush()  # a write error ends the run here
            return metas
        finally:
            self.files.close()  # whatever ended the run: every finished cell's files are written
            self.host.close()
            await self.pool.close()
            save_telemetry(self.run_dir, await asyncio.gather(*(s.stop.remote() for s in samplers), return_exceptions=True))
            for s in samplers:
                ray.kill(s)

    def finalize(self, metas: list[dict[str, Any]]) -> Path:
        status = assemble(self.run_dir, self.cfg, self.run_id, metas, self.tables)
        self._write_manifest({m["cell_id"]: m for m in metas}, status, self._serving_modes())
        write_reports(load_packet(self.run_dir))
        self.dest.publish_run(self.run_dir)
        return self.run_dir

    def run(self, on_progress: Callable[[RunProgress], None] | None = None) -> Path:
        lock = resume.hold(self.run_dir) if self.opts.resume is not None else None
        if lock is not None:
            resume.clear_temporaries(self.run_dir)
        try:
            return self._run(on_progress, lock)
        finally:
            if lock is not None:
                lock.release()

    def _bundles(self) -> list[list[dict[str, float]]]:
        # The cluster's resources read once: a read per cell cost ~0.5 ms with 8 virtual nodes, more with more.
        total = ray.cluster_resources()
        out = []
        for p in self.plans:
            try:
                b = MODES[p.serving_mode].bundles(self.context(p))
                ray_env.check_fits(b, "placement", total)
            except RuntimeError as e:
                raise ConfigError(f"invalid config:\n  placement.gpus_per_engine/cpus_per_engine: {e}") from None
            out.append(b)
        return out

    def _run(self, on_progress: Callable[[RunProgress], None] | None, lock: FileLock | None) -> Path:
        self.facts.ray_info = ray_env.connect(self.opts.address)
        self.facts.concurrency = cell_concurrency(self.cfg, self._bundles(), self.track.measures_latency)
        if lock is None:  # a new run: its folder is made here and held from the start
            self.run_dir.mkdir(parents=True, exist_ok=False)
            lock = resume.hold(self.run_dir)
            try:
                write_yaml(self.run_dir / "config.yaml", to_yaml(self.cfg))
                self._write_manifest({}, "running", self._serving_modes())
                self.dest.publish_run(self.run_dir)
                return self.finalize(asyncio.run(self._run_all(on_progress)))
            finally:
                lock.release()
        return self.finalize(asyncio.run(self._run_all(on_progress)))
