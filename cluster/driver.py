"""The driver: expand a track into cells, run them on placement groups, persist, summarise.

Each finished cell is written atomically under `cells/<cell_id>/` before the next result is
awaited, so a killed run loses at most the cells in flight. The run-level files
(requests.parquet, summary.json, manifest.json, reports) are rebuilt from those cell files.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray

from actors.engines import EngineConfig
from actors.progress import ProgressCounter
from analysis.packet import load_packet, write_json, write_parquet, write_yaml
from analysis.report import write_reports
from analysis.summary import build_summary
from cluster import manifest as mf
from cluster import ray_env
from cluster.cells import MODES, CellContext
from cluster.config import ConfigError, ExperimentConfig, config_hash, sha256_of, to_yaml
from workloads.tracks import CellPlan, get_track


@dataclass
class RunOptions:
    out_dir: Path = Path("runs")
    address: str | None = None
    progress: bool = True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_cells(cfg: ExperimentConfig) -> list[CellPlan]:
    track = get_track(cfg.track)
    return track.cells(cfg.workload, track.params_model.model_validate(cfg.params))


def cell_engine(cfg: ExperimentConfig, plan: CellPlan) -> EngineConfig:
    return EngineConfig.model_validate({**cfg.engine.model_dump(), **plan.engine_overrides})


def cell_hash(cfg: ExperimentConfig, plan: CellPlan) -> str:
    """What decides a cell's result: engine, workload, seed, mode and engine count, KV transfer,
    SLO, placement (not its name)."""
    return sha256_of(
        {
            "engine": cell_engine(cfg, plan).model_dump(mode="json"),
            "workload": plan.workload.model_dump(mode="json"),
            "seed": cfg.seed + plan.seed_offset,
            "mode": plan.mode,
            "replicas": plan.replicas,
            "kv_transfer": cfg.kv_transfer.model_dump(mode="json"),
            "placement": cfg.placement.model_dump(mode="json"),
            "slo": cfg.slo.model_dump(mode="json"),
        }
    )


def preflight(cfg: ExperimentConfig, plans: list[CellPlan]) -> None:
    """Refuse what can never run before any engine starts (DESIGN.md, Reliability)."""
    errors = []
    for p in plans:
        if p.mode not in MODES:
            errors.append(f"  mode: cell {p.cell_id} asks for serving mode {p.mode!r}; allowed: {', '.join(MODES)}")
            continue
        eng = cell_engine(cfg, p)
        need = p.workload.input_len.upper + p.workload.output_len.upper
        if need > eng.max_model_len:
            errors.append(
                f"  workload.input_len/output_len: cell {p.cell_id} can ask for {need} tokens "
                f"but engine.max_model_len is {eng.max_model_len}"
            )
    if cfg.engine.kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            errors.append("  engine.kind: 'vllm' needs vllm installed (pip install -e '.[vllm]' on a GPU node)")
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(dict.fromkeys(errors)))


class Driver:
    def __init__(self, cfg: ExperimentConfig, opts: RunOptions):
        self.cfg = cfg
        self.opts = opts
        self.plans = plan_cells(cfg)
        self.hash = config_hash(cfg)
        self.run_id = f"{cfg.track}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{self.hash[:8]}-{secrets.token_hex(2)}"
        self.run_dir = Path(opts.out_dir) / self.run_id
        self.started_at = _now()
        self.ray_info: dict[str, Any] = {}

    # --- cells -----------------------------------------------------------------------------
    def context(self, plan: CellPlan, progress: Any = None) -> CellContext:
        return CellContext(
            run_id=self.run_id,
            cfg=self.cfg,
            plan=plan,
            engine=cell_engine(self.cfg, plan),
            seed=self.cfg.seed + plan.seed_offset,
            progress=progress,
        )

    async def _run_cell(self, plan: CellPlan, progress: Any) -> dict[str, Any]:
        cell_dir = self.run_dir / "cells" / plan.cell_id
        meta: dict[str, Any] = {
            "cell_id": plan.cell_id,
            "labels": plan.labels,
            "serving_mode": plan.mode,
            "config_hash": cell_hash(self.cfg, plan),
            "seed": self.cfg.seed + plan.seed_offset,
            "started_at": _now(),
        }
        t0 = time.monotonic()
        try:
            result = await MODES[plan.mode].run(self.context(plan, progress))
            write_parquet(cell_dir / "requests.parquet", result.requests)
            if result.transfers is not None:
                write_parquet(cell_dir / "transfers.parquet", result.transfers)
            meta.update(result.meta, status="ok", error=None)
        except Exception as e:  # the cell fails with its reason; the sweep goes on
            meta.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        meta["ended_at"] = _now()
        meta["wall_s"] = time.monotonic() - t0
        write_json(cell_dir / "cell.json", meta)
        return meta

    async def _run_all(self, on_progress: Callable[[int, int, int], None] | None) -> list[dict[str, Any]]:
        progress = ProgressCounter.remote()
        sem = asyncio.Semaphore(self.cfg.max_concurrent_cells)
        cells_done = 0

        async def one(plan: CellPlan) -> dict[str, Any]:
            nonlocal cells_done
            async with sem:
                meta = await self._run_cell(plan, progress)
            cells_done += 1
            return meta

        tasks = [asyncio.ensure_future(one(p)) for p in self.plans]
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.5)
            if on_progress is not None:
                done, _failed = await progress.read.remote()
                on_progress(cells_done, done, len(self.plans))
        ray.kill(progress)
        return [t.result() for t in tasks]

    # --- packet ----------------------------------------------------------------------------
    def _manifest(self, cells: dict[str, Any], status: str) -> dict[str, Any]:
        info = next((c["engine_info"] for c in cells.values() if c.get("engine_info")), {})
        try:
            nodes = ray_env.on_each_node(mf.hardware)
        except Exception:  # a dead node must not cost the packet its manifest
            nodes = [mf.hardware()]
        return {
            "run_id": self.run_id,
            "track": self.cfg.track,
            "config_hash": self.hash,
            "mode": "simulated" if self.cfg.simulated else "real",
            "engine": self.cfg.engine.kind,
            "serving_modes": sorted({p.mode for p in self.plans}),
            "model": {
                "name": info.get("model", self.cfg.engine.model),
                "architecture": info.get("architecture"),
                "architecture_hash": (info.get("architecture") or {}).get("hash"),
                "dtype": self.cfg.engine.dtype,
                "kv_bytes_per_token": info.get("kv_bytes_per_token"),
                "device": info.get("device"),
            },
            "versions": mf.versions(),
            "hardware": {"summary": nodes[0]["summary"], "nodes": nodes},
            "ray": self.ray_info,
            "seeds": {
                "config": self.cfg.seed,
                "weights": self.cfg.engine.weight_seed,
                "cells": {c: m.get("seed") for c, m in cells.items()},
            },
            "started_at": self.started_at,
            "ended_at": _now() if status != "running" else None,
            "status": status,
            "cells": {c: {"status": m.get("status"), "error": m.get("error"), "config_hash": m.get("config_hash")} for c, m in cells.items()},
        }

    def finalize(self, metas: list[dict[str, Any]]) -> Path:
        cells = {m["cell_id"]: m for m in metas}
        frames = [
            pd.read_parquet(self.run_dir / "cells" / c / "requests.parquet") for c, m in cells.items() if m["status"] == "ok"
        ]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        write_parquet(self.run_dir / "requests.parquet", df)
        transfers = [
            pd.read_parquet(p) for c, m in cells.items() if m["status"] == "ok" and (p := self.run_dir / "cells" / c / "transfers.parquet").is_file()
        ]
        tdf = pd.concat(transfers, ignore_index=True) if transfers else None
        if tdf is not None:
            write_parquet(self.run_dir / "transfers.parquet", tdf)
        n_ok = sum(m["status"] == "ok" for m in metas)
        status = "complete" if n_ok == len(metas) else ("partial" if n_ok else "failed")
        mode = "simulated" if self.cfg.simulated else "real"
        write_json(
            self.run_dir / "summary.json",
            build_summary(self.cfg.track, self.run_id, mode, df, cells, self.cfg.slo.model_dump(), self.cfg.params, tdf),
        )
        write_json(self.run_dir / "manifest.json", self._manifest(cells, status))
        write_reports(load_packet(self.run_dir))
        return self.run_dir

    def run(self, on_progress: Callable[[int, int, int], None] | None = None) -> Path:
        preflight(self.cfg, self.plans)
        self.ray_info = ray_env.connect(self.opts.address)
        for p in self.plans:
            try:
                ray_env.check_fits(MODES[p.mode].bundles(self.context(p)), "placement")
            except RuntimeError as e:
                raise ConfigError(f"invalid config:\n  placement.gpus_per_engine/cpus_per_engine: {e}") from None
        self.run_dir.mkdir(parents=True, exist_ok=False)
        write_yaml(self.run_dir / "config.yaml", to_yaml(self.cfg))
        write_json(self.run_dir / "manifest.json", self._manifest({}, "running"))
        metas = asyncio.run(self._run_all(on_progress))
        return self.finalize(metas)

