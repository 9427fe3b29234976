"""The driver: expand a track into cells, run them on placement groups, persist, summarise.

Each finished cell is written atomically under `cells/<cell_id>/` before the next result is
awaited, so a killed run loses at most the cells in flight; `--resume` (RunOptions.resume)
runs only the cells that have no finished result with the same cell config hash. The run-level
files (requests.parquet, summary.json, manifest.json, memory.json, reports) are rebuilt from
the cell files, so they never hold a cell twice.

A track's cells run in rounds: the first is its grid, each further round is what the track's
`next_cells` proposes from the finished cells' metrics (E2's rate search). Cells of a round run
concurrently, up to `max_concurrent_cells`, each on its own placement group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from filelock import FileLock, Timeout

from actors.engines import EngineConfig
from actors.engines.models import model_path_problem
from actors.progress import CellCounter, ProgressCounter
from actors.telemetry import TelemetrySampler
from analysis.errortext import MAX_LINE, first_line, one_line
from analysis.metrics import cell_metrics, workload_of
from analysis.packet import PacketError, load_packet, read_json, read_parquet, write_json, write_log, write_parquet, write_yaml
from analysis.records import measured
from analysis.redact import treat_env_as_secret
from analysis.report import write_reports
from analysis.schemas import SCHEMA_VERSION, read_requests
from analysis.summary import build_summary
from cluster import manifest as mf
from cluster import ray_env
from cluster.cells import MODES, CellContext
from cluster.config import UNHASHED, ConfigError, ExperimentConfig, config_hash, sha256_of, to_yaml
from cluster.engine_pool import EnginePool, engine_use_record, grouped
from cluster.hostload import HostLoadProbe
from cluster.storage import Destination
from workloads.arrivals import schedule_problem
from workloads.text import get_codec
from workloads.tracks import CellOutcome, CellPlan, Track, get_track

TELEMETRY_INTERVAL_S = 1.0
# A running manifest is rewritten at most this often (it lists every cell: once per cell made a
# 1,000-cell sweep quadratic); the cell files, which resume reads, are written per cell as before.
MANIFEST_EVERY_S = 2.0
LOCK_FILE = ".pdbench.lock"  # a dot file: never published, never part of the packet
# Cell statuses whose records count: `partial` is a fault after the requests ran (records kept).
MEASURED = ("ok", "partial")


def one_line_errors(df: pd.DataFrame | None) -> tuple[pd.DataFrame | None, list[str]]:
    """Records whose `error` is more than one line (a remote traceback, colour codes) keep its
    first line; the whole texts come back for errors.log."""
    if df is None or "error" not in df.columns:
        return df, []
    long = [e for e in df["error"].dropna().unique() if isinstance(e, str) and ("\n" in e.strip() or "\x1b" in e or len(e) > MAX_LINE)]
    if not long:
        return df, []
    short = {e: first_line(e) for e in long}
    return df.assign(error=df["error"].map(lambda e: short.get(e, e) if isinstance(e, str) else e)), [str(e) for e in long]


def no_success(df: pd.DataFrame) -> str | None:
    """Why a cell measured nothing (no measured request succeeded), or None."""
    rows = measured(df) if not df.empty else df
    if not rows.empty and rows["ok"].astype(bool).any():
        return None
    if rows.empty:
        return "no request was measured"
    errors = rows["error"].dropna()
    first = f"; first error: {str(errors.iloc[0]).splitlines()[0][:200]}" if not errors.empty else ""
    return f"no request succeeded ({len(rows)} of {len(rows)} failed){first}"


@dataclass
class RunOptions:
    out_dir: str | Path = "runs"  # a folder or a pyarrow.fs URI (cluster/storage.py)
    address: str | None = None
    progress: bool = True
    resume: Path | None = None


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan_cells(cfg: ExperimentConfig) -> list[CellPlan]:
    """The track's first round of cells. Workload errors (a missing dataset file, a prompt that
    cannot be built) are config errors naming the field."""
    track = get_track(cfg.track)
    try:
        plans = track.cells(cfg.workload, track.params_model.model_validate(cfg.params))
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  {e}") from None
    return for_target(cfg, plans)


def for_target(cfg: ExperimentConfig, plans: list[CellPlan]) -> list[CellPlan]:
    """With a `target:`, every cell (of every round) drives that server over HTTP."""
    if cfg.target is not None and cfg.target.api_key_env:
        treat_env_as_secret(cfg.target.api_key_env)  # its value never reaches a packet file
    if cfg.target is None:
        return plans
    if cfg.simulated:
        raise ConfigError("invalid config:\n  target: an external server is real; it cannot run with --simulate")
    tuned = sorted({k for p in plans for k in p.engine_overrides})
    if tuned:
        raise ConfigError(
            f"invalid config:\n  target: track {cfg.track} sets the engine per cell ({', '.join(tuned)}); "
            "an external server's engine is not pdbench's to set"
        )
    modes = sorted({p.serving_mode for p in plans})
    if len(modes) > 1:
        raise ConfigError(
            f"invalid config:\n  target: track {cfg.track} compares serving modes {', '.join(modes)}; "
            "an external server is one deployment (run this track on pdbench's engines)"
        )
    return [dataclasses.replace(p, serving_mode="external") for p in plans]


def cell_node_ids(meta: dict[str, Any], df: pd.DataFrame) -> dict[str, list[str]]:
    """Ray node ids a cell ran on, by role (the manifest's per-cell `nodes`)."""
    out: dict[str, list[str]] = {}
    for col in df.columns if not df.empty else []:
        if col.endswith("_node_id"):
            out[col.removesuffix("_node_id")] = sorted(df[col].dropna().astype(str).unique())
    if not out.get("engine") and (meta.get("engine_info") or {}).get("node"):
        out["engine"] = [meta["engine_info"]["node"]["node_id"]]
    return out


def cell_engine(cfg: ExperimentConfig, plan: CellPlan) -> EngineConfig:
    return EngineConfig.model_validate({**cfg.engine.model_dump(), **plan.engine_overrides})


def cell_hash(cfg: ExperimentConfig, plan: CellPlan) -> str:
    """What decides a cell's result: engine, workload (and the prompts a track built), seed,
    mode and engine count, KV transfer, SLO, placement; not its name."""
    what: dict[str, Any] = {
        "engine": cell_engine(cfg, plan).model_dump(mode="json"),
        # The steady-state window only changes the analysis; old cells' hashes stand without it.
        "workload": plan.workload.model_dump(mode="json", exclude={"steady_state"}),
        "seed": cfg.seed + plan.seed_offset,
        "mode": plan.serving_mode,  # the serving mode, under its old key: renaming it would change every cell's hash
        "replicas": plan.replicas,
        "kv_transfer": cfg.kv_transfer.model_dump(mode="json"),
        "placement": cfg.placement.model_dump(mode="json", exclude=UNHASHED["placement"]),
        "slo": cfg.slo.model_dump(mode="json"),
    }
    if plan.requests is not None:
        what["requests"] = sha256_of([[r.request_id, list(r.prompt_token_ids), r.max_tokens, r.warmup, r.meta] for r in plan.requests])
        what["tokenizer"] = plan.tokenizer
    if plan.measured_slice is not None:  # one stretch of the requests (E0's rounds); unsliced cells' hashes stand
        what["measured_slice"] = list(plan.measured_slice)
    if cfg.target is not None:  # another server is another result (only then: old hashes stand)
        what["target"] = cfg.target.model_dump(mode="json")
    return sha256_of(what)


def cell_concurrency(cfg: ExperimentConfig, bundles: list[list[dict[str, float]]], measures_latency: bool = True) -> int:
    """`max_concurrent_cells`, with `auto` resolved against the cluster.

    auto: as many cells at once as the cluster's resources hold (GPUs, CPUs), so the same command
    spreads over more nodes on a bigger cluster; except CPU-only cells of a track that measures
    latency, which run one at a time, because cells sharing cores would measure each other's load.
    """
    if cfg.max_concurrent_cells != "auto":
        return int(cfg.max_concurrent_cells)
    need: dict[str, float] = {}
    for cell in bundles:
        per: dict[str, float] = {}
        for b in cell:
            for k, v in b.items():
                per[k] = per.get(k, 0.0) + v
        for k, v in per.items():
            need[k] = max(need.get(k, 0.0), v)
    if not need or (measures_latency and not need.get("GPU")):
        return 1
    total = ray.cluster_resources()
    return max(1, min(int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0))


def preflight(cfg: ExperimentConfig, plans: list[CellPlan]) -> None:
    """Refuse what can never run before any engine starts."""
    errors = []
    for p in plans:
        if p.serving_mode not in MODES:
            errors.append(f"  serving_mode: cell {p.cell_id} asks for serving mode {p.serving_mode!r}; allowed: {', '.join(MODES)}")
            continue
        eng = cell_engine(cfg, p)
        problem = schedule_problem(p.workload.arrival, p.workload.num_requests)
        if problem:  # a track's own rates (params.rates, a rate search) skip WorkloadSpec's check
            errors.append(f"  workload.arrival.rate (or the track's params rates): cell {p.cell_id}: {problem}")
        need = p.workload.input_len.upper + p.workload.output_len.upper
        if need > eng.max_model_len and cfg.target is None:
            errors.append(
                f"  workload.input_len/output_len (or the track's params lengths): cell {p.cell_id} can ask for {need} tokens "
                f"but engine.max_model_len is {eng.max_model_len}"
            )
    for model in sorted({cell_engine(cfg, p).model for p in plans if p.serving_mode in MODES}) if cfg.target is None else []:
        problem = model_path_problem(model)
        if problem:
            errors.append(f"  engine.model: {problem}")
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
        self.track = get_track(cfg.track)
        self.params = self.track.params_model.model_validate(cfg.params)
        self.plans = plan_cells(cfg)
        preflight(cfg, self.plans)  # before anything is made or shown: what can never run is refused
        self.hash = config_hash(cfg)
        self.ray_info: dict[str, Any] = {}
        self.resumed_at: list[str] = []
        self.concurrency: int | None = None  # max_concurrent_cells resolved against the cluster in run()
        self._nodes: list[dict[str, Any]] | None = None
        self.pool: EnginePool | None = None  # warm engines, made in run() (cluster/engine_pool.py)
        self._versions: dict[str, Any] | None = None  # code versions, read once (git runs twice per read)
        self._manifest_at = 0.0
        self.dest = Destination(opts.out_dir)
        if opts.resume is None:
            self.dest.check_writable()
            self.run_id = f"{cfg.track}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{self.hash[:8]}-{secrets.token_hex(2)}"
            self.run_dir = self.dest.local_dir(self.run_id)
            self.started_at = _now()
        else:
            self._adopt(Path(opts.resume))
        # Where the packet ends up: the URI for shared storage, else the folder itself.
        self.location = self.dest.location(self.run_id) if self.dest.remote else str(self.run_dir)

    def _adopt(self, run_dir: Path) -> None:
        """Resume: take over an earlier run's folder, id and start time; refuse another config."""
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: {run_dir} is not a folder; give the runs/<run-id>/ folder of the run to continue")
        try:
            prior = read_json(run_dir / "manifest.json")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"--resume: {run_dir} is not a pdbench run folder (no readable manifest.json)") from None
        if not isinstance(prior, dict):
            raise ConfigError(f"--resume: {run_dir}/manifest.json is not a pdbench manifest")
        if prior.get("track") != self.cfg.track:
            raise ConfigError(f"--resume: {run_dir} is a run of track {prior.get('track')!r}, not {self.cfg.track!r}")
        if prior.get("config_hash") != self.hash:
            raise ConfigError(
                f"--resume: {run_dir} was run with config hash {str(prior.get('config_hash'))[:12]}…, this command "
                f"resolves to {self.hash[:12]}…; resume with the same config, seed and engine flags "
                f"(leave out --config to reuse {run_dir / 'config.yaml'})"
            )
        self.run_id = prior["run_id"]
        self.run_dir = run_dir
        self.started_at = prior["started_at"]
        self.resumed_at = [*prior.get("resumed_at", []), _now()]

    # --- cells -----------------------------------------------------------------------------
    def context(self, plan: CellPlan, progress: Any = None) -> CellContext:
        return CellContext(
            run_id=self.run_id,
            cfg=self.cfg,
            plan=plan,
            engine=cell_engine(self.cfg, plan),
            seed=self.cfg.seed + plan.seed_offset,
            progress=progress,
            pool=self.pool,
        )

    def _cell_dir(self, plan: CellPlan) -> Path:
        return self.run_dir / "cells" / plan.cell_id

    def _finished(self, plan: CellPlan) -> dict[str, Any] | None:
        """A resumable result: status ok, same cell config hash, its records on disk."""
        d = self._cell_dir(plan)
        try:
            meta = read_json(d / "cell.json")
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if meta.get("status") != "ok" or meta.get("config_hash") != cell_hash(self.cfg, plan) or not (d / "requests.parquet").is_file():
            return None
        try:  # a damaged record file (a disk filled, a bad copy) means the cell runs again
            read_parquet(d / "requests.parquet")
            if (d / "transfers.parquet").is_file():
                read_parquet(d / "transfers.parquet")
        except PacketError:
            return None
        return meta

    def _clear(self, plan: CellPlan) -> None:
        """Before a (re)run: drop what an earlier, unfinished or failed attempt left behind."""
        d = self._cell_dir(plan)
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()

    async def _run_cell(self, plan: CellPlan, progress: Any) -> dict[str, Any]:
        cell_dir = self._cell_dir(plan)
        self._clear(plan)
        meta: dict[str, Any] = {
            "cell_id": plan.cell_id,
            "labels": plan.labels,
            "serving_mode": plan.serving_mode,
            "config_hash": cell_hash(self.cfg, plan),
            "seed": self.cfg.seed + plan.seed_offset,
            "started_at": _now(),
            # What analysis needs of the workload: the offered rate and the steady-state window.
            "arrival": plan.workload.arrival.model_dump(mode="json"),
            "steady_state": plan.workload.steady_state.model_dump(mode="json"),
        }
        if plan.provenance:
            meta["provenance"] = plan.provenance
        t0 = time.monotonic()
        load = HostLoadProbe()
        ctx = self.context(plan, progress)
        try:
            preflight(self.cfg, [plan])  # later rounds were not checked before the run began
            result = await MODES[plan.serving_mode].run(ctx)
            df, long_errors = one_line_errors(self._annotate(plan, result.requests, result.meta))
            transfers, more = one_line_errors(result.transfers)
            if long_errors + more:  # remote tracebacks: the whole text in the log, one line in the tables
                meta["log"] = f"cells/{plan.cell_id}/errors.log"
                write_log(cell_dir / "errors.log", "\n\n".join(long_errors + more))
            assert df is not None  # a cell always returns its request records (maybe empty)
            write_parquet(cell_dir / "requests.parquet", df)
            if transfers is not None:
                write_parquet(cell_dir / "transfers.parquet", transfers)
            meta.update(result.meta, node_ids=cell_node_ids(result.meta, result.requests))
            nothing = no_success(df)
            if nothing:  # every request failed: the records stay as evidence, the cell did not measure
                meta.update(status="failed", error=nothing)
            elif result.fault:
                meta.update(status="partial", error=f"fault after the requests ran, records kept: {result.fault}")
            else:
                meta.update(status="ok", error=None)
        except Exception as e:  # the cell fails with its reason (one line); the traceback goes to errors.log
            meta.update(status="failed", error=one_line(e), log=f"cells/{plan.cell_id}/errors.log")
            write_log(cell_dir / "errors.log", traceback.format_exc())
        meta["ended_at"] = _now()
        meta["wall_s"] = time.monotonic() - t0
        meta["engine_use"] = engine_use_record(ctx, len(MODES[plan.serving_mode].bundles(ctx)))
        meta["host_load"] = dataclasses.asdict(load.stop())
        write_json(cell_dir / "cell.json", meta)
        self.dest.publish_cell(self.run_dir, plan.cell_id)
        return meta

    @staticmethod
    def _annotate(plan: CellPlan, df: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
        """Disaggregated rows get the pair's node ids. Track-built prompts: each row gets its
        request's meta (answer, depth) and, where a tokenizer made the prompt, the decoded output,
        so scoring needs the files alone."""
        if isinstance(meta.get("nodes"), dict) and not df.empty:
            df = df.assign(**{f"{role}_node_id": node for role, node in meta["nodes"].items()})
        if plan.requests is None or df.empty:
            return df
        metas = {r.request_id: json.dumps(r.meta, sort_keys=True) if r.meta else None for r in plan.requests}
        df = df.assign(meta=df["request_id"].map(metas))
        if plan.tokenizer:
            codec = get_codec(plan.tokenizer)
            df = df.assign(output_text=[codec.decode(ids) for ids in df["output_token_ids"]])
        return df

    def _outcome(self, plan: CellPlan, meta: dict[str, Any]) -> CellOutcome:
        metrics = None
        if meta.get("status") == "ok":
            rows = measured(read_parquet(self._cell_dir(plan) / "requests.parquet"))
            metrics = cell_metrics(rows, self.cfg.slo, *workload_of(meta)) if not rows.empty else None
        return CellOutcome(plan.cell_id, dict(plan.labels), meta.get("status") == "ok", meta.get("error"), metrics)

    async def _run_all(self, on_progress: Callable[[RunProgress], None] | None) -> list[dict[str, Any]]:
        samplers = ray_env.actor_on_each_node(TelemetrySampler, TELEMETRY_INTERVAL_S)
        await asyncio.gather(*(s.start.remote() for s in samplers))
        self.pool = EnginePool(reuse=not self.cfg.fresh_engines, capacity=self.concurrency or 1)
        try:
            return await self._run_rounds(on_progress)
        finally:
            await self.pool.close()
            self._save_telemetry(await asyncio.gather(*(s.stop.remote() for s in samplers), return_exceptions=True))
            for s in samplers:
                ray.kill(s)

    def _save_telemetry(self, per_node: list[Any]) -> None:
        """telemetry.parquet: GPU/CPU samples of every node over the run (a resumed run appends)."""
        rows = [r for got in per_node if isinstance(got, list) for r in got]
        path = self.run_dir / "telemetry.parquet"
        df = pd.DataFrame(rows)
        if path.is_file():
            with contextlib.suppress(PacketError):  # an earlier attempt's samples were damaged: this attempt's stand alone
                df = pd.concat([read_parquet(path), df], ignore_index=True)
        if not df.empty:
            write_parquet(path, df)

    async def _run_rounds(self, on_progress: Callable[[RunProgress], None] | None) -> list[dict[str, Any]]:
        progress = ProgressCounter.remote()  # type: ignore[attr-defined]  # a Ray actor class
        sem = asyncio.Semaphore(self.concurrency or 1)
        metas: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, CellOutcome] = {}
        counts = {"cells": 0, "resumed_requests": 0}
        round_plans = list(self.plans)
        self.plans = []

        running: set[str] = set()
        adaptive = type(self.track).next_cells is not Track.next_cells

        async def one(plan: CellPlan) -> dict[str, Any]:
            meta = self._finished(plan)
            if meta is not None:
                counts["resumed_requests"] += plan.num_requests
                metas[plan.cell_id] = meta
            else:
                async with sem:
                    running.add(plan.cell_id)
                    meta = await self._run_cell(plan, CellCounter(progress, plan.cell_id))
                    running.discard(plan.cell_id)
                metas[plan.cell_id] = meta
                # Only a cell that ran marks the run running: a resume with nothing to redo leaves a
                # complete manifest complete until finalize rewrites it.
                if time.monotonic() - self._manifest_at >= MANIFEST_EVERY_S:
                    self._manifest_at = time.monotonic()
                    write_json(self.run_dir / "manifest.json", self._manifest(metas, "running"))
            counts["cells"] += 1
            return meta

        while True:  # a round; the first may be empty when a track is adaptive only
            self.plans += round_plans
            # Cells of one engine configuration one after another: each can take the last one's warm engine.
            tasks = [asyncio.ensure_future(one(p)) for p in grouped(round_plans, lambda p: cell_engine(self.cfg, p).model_dump_json())]
            while tasks and not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5 if on_progress is not None else None)  # no display: no polling
                if on_progress is not None:
                    sent, _failed = await progress.read.remote()
                    per_cell = await progress.read_cells.remote()
                    states = tuple(
                        CellState(
                            p.cell_id,
                            metas[p.cell_id].get("status", "failed")
                            if p.cell_id in metas
                            else ("running" if p.cell_id in running else "waiting"),
                            p.num_requests if p.cell_id in metas and p.cell_id not in per_cell else per_cell.get(p.cell_id, 0),
                            p.num_requests,
                        )
                        for p in self.plans
                    )
                    on_progress(
                        RunProgress(
                            counts["cells"],
                            len(self.plans),
                            sent + counts["resumed_requests"],
                            sum(p.num_requests for p in self.plans),
                            states,
                        )
                    )
            for p in round_plans if adaptive else ():  # a fixed grid reads no outcome: no metrics to compute
                outcomes[p.cell_id] = self._outcome(p, metas[p.cell_id])
            known = {p.cell_id for p in self.plans}
            proposed = for_target(self.cfg, self.track.next_cells(self.cfg.workload, self.params, outcomes))
            round_plans = list({p.cell_id: p for p in proposed if p.cell_id not in known}.values())
            if not round_plans:
                break
        ray.kill(progress)
        return [metas[p.cell_id] for p in self.plans]

    # --- packet ----------------------------------------------------------------------------
    def _manifest(self, cells: dict[str, Any], status: str) -> dict[str, Any]:
        info: dict[str, Any] = next((c["engine_info"] for c in cells.values() if c.get("engine_info")), {})
        if self._nodes is None:
            try:
                self._nodes = ray_env.on_each_node(mf.hardware)
            except Exception:  # a dead node must not cost the packet its manifest
                self._nodes = [mf.hardware()]
        nodes = self._nodes
        self._versions = self._versions or mf.versions()
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "track": self.cfg.track,
            "config_hash": self.hash,
            "evidence": "simulated" if self.cfg.simulated else "real",
            "engine": "external" if self.cfg.target else self.cfg.engine.kind,
            "target": self.cfg.target.model_dump(mode="json") if self.cfg.target else None,
            "serving_modes": sorted({p.serving_mode for p in self.plans}),
            "model": {
                "name": info.get("model", self.cfg.engine.model),
                "architecture": info.get("architecture"),
                "architecture_hash": (info.get("architecture") or {}).get("hash"),
                "dtype": self.cfg.engine.dtype,
                "kv_bytes_per_token": info.get("kv_bytes_per_token"),
                "device": info.get("device"),
                "random_weights": info.get("random_weights"),
            },
            "versions": self._versions,
            "hardware": {"summary": nodes[0]["summary"], "nodes": nodes},
            "ray": self.ray_info,
            "max_concurrent_cells": self.concurrency,
            # Warm engines (docs/metrics.md): engines started over the run, and per cell below.
            "engine_pool": {
                "reuse": not self.cfg.fresh_engines,
                "pooled_modes": ["aggregated"],
                "engine_starts": sum((m.get("engine_use") or {}).get("engine_starts", 0) for m in cells.values()),
                "cells_on_warm_engines": sum((m.get("engine_use") or {}).get("engine") == "reused" for m in cells.values()),
            },
            "seeds": {
                "config": self.cfg.seed,
                "weights": self.cfg.engine.weight_seed,
                "cells": {c: m.get("seed") for c, m in cells.items()},
            },
            "started_at": self.started_at,
            "resumed_at": self.resumed_at,
            "ended_at": _now() if status != "running" else None,
            "status": status,
            "cells": {
                c: {"status": m.get("status"), "error": m.get("error"), "config_hash": m.get("config_hash"), "nodes": m.get("node_ids")}
                | {"engine": (m.get("engine_use") or {}).get("engine"), "wall_s": m.get("wall_s")}
                | ({"log": m["log"]} if m.get("log") else {})
                for c, m in cells.items()
            },
            # Where track-built prompts came from: a dataset subset's ids and their hash (E4).
            "provenance": {c: m["provenance"] for c, m in cells.items() if m.get("provenance")},
        }

    def finalize(self, metas: list[dict[str, Any]]) -> Path:
        cells = {m["cell_id"]: m for m in metas}
        kept = [c for c, m in cells.items() if m["status"] in MEASURED]
        frames = [read_requests(read_parquet(self.run_dir / "cells" / c / "requests.parquet")) for c in kept]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        write_parquet(self.run_dir / "requests.parquet", df)
        transfers = [read_parquet(p) for c in kept if (p := self.run_dir / "cells" / c / "transfers.parquet").is_file()]
        tdf = pd.concat(transfers, ignore_index=True) if transfers else None
        if tdf is not None:
            write_parquet(self.run_dir / "transfers.parquet", tdf)
        memory = {c: m["memory"] for c, m in cells.items() if m.get("memory")}
        if memory:
            write_json(self.run_dir / "memory.json", memory)
        logs = [f"== cell {c}\n{(self.run_dir / m['log']).read_text()}" for c, m in cells.items() if m.get("log")]
        if logs:
            write_log(self.run_dir / "errors.log", "\n".join(logs))
        n_ok = sum(m["status"] == "ok" for m in metas)
        status = "complete" if n_ok == len(metas) else ("partial" if kept else "failed")
        evidence = "simulated" if self.cfg.simulated else "real"
        write_json(
            self.run_dir / "summary.json",
            build_summary(self.cfg.track, self.run_id, evidence, df, cells, self.cfg.slo.model_dump(), self.cfg.params, tdf),
        )
        write_json(self.run_dir / "manifest.json", self._manifest(cells, status))
        write_reports(load_packet(self.run_dir))
        self.dest.publish_run(self.run_dir)
        return self.run_dir

    def _lock(self) -> FileLock:
        """One pdbench process per run folder: a second `--resume` of a run in progress would run
        the same cells (same placement group names) and race it for the same files."""
        lock = FileLock(self.run_dir / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"--resume: {self.run_dir} is being run by another pdbench process right now; wait for it to end (or end it), then resume"
            ) from None
        return lock

    def run(self, on_progress: Callable[[RunProgress], None] | None = None) -> Path:
        lock = self._lock() if self.opts.resume is not None else None
        if lock is not None:
            # Atomic writes of a killed run leave their temporary files (write_json, write_parquet):
            # holding the lock, nothing else writes here, so any left is a dead process's.
            for tmp in self.run_dir.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        try:
            return self._run(on_progress, lock)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, on_progress: Callable[[RunProgress], None] | None, lock: FileLock | None) -> Path:
        self.ray_info = ray_env.connect(self.opts.address)
        bundles = []
        for p in self.plans:
            try:
                b = MODES[p.serving_mode].bundles(self.context(p))
                ray_env.check_fits(b, "placement")
            except RuntimeError as e:
                raise ConfigError(f"invalid config:\n  placement.gpus_per_engine/cpus_per_engine: {e}") from None
            bundles.append(b)
        self.concurrency = cell_concurrency(self.cfg, bundles, self.track.measures_latency)
        if lock is None:  # a new run: its folder is made here and held from the start
            self.run_dir.mkdir(parents=True, exist_ok=False)
            lock = self._lock()
            try:
                write_yaml(self.run_dir / "config.yaml", to_yaml(self.cfg))
                write_json(self.run_dir / "manifest.json", self._manifest({}, "running"))
                self.dest.publish_run(self.run_dir)
                return self.finalize(asyncio.run(self._run_all(on_progress)))
            finally:
                lock.release()
        return self.finalize(asyncio.run(self._run_all(on_progress)))
