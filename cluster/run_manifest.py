"""manifest.json of a run: what ran, on what, from which config, and how each cell ended.

Written when the run starts, after each cell that ran (status `running`) and at the end; the
facts that do not change over the run are gathered once in `RunFacts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from analysis.schemas import SCHEMA_VERSION
from cluster import manifest as mf
from cluster import ray_env
from cluster.cells.engine_pool import POOLED_MODES, pool_depth
from cluster.config import ExperimentConfig


def now() -> str:
    """UTC, to the millisecond: cells of a fast sweep start within one second of each other, and
    their order must still read from the stamps."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RunFacts:
    cfg: ExperimentConfig
    run_id: str
    config_hash: str
    started_at: str
    resumed_at: list[str]
    ray_info: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None  # max_concurrent_cells resolved against the cluster
    _nodes: list[dict[str, Any]] | None = None
    _versions: dict[str, Any] | None = None

    def versions(self) -> dict[str, Any]:
        """Code versions, read once per run (git runs twice per read)."""
        if self._versions is None:
            self._versions = mf.versions()
        return self._versions

    def nodes(self) -> list[dict[str, Any]]:
        if self._nodes is None:
            try:
                self._nodes = ray_env.on_each_node(mf.hardware)
            except Exception:  # a dead node must not cost the packet its manifest
                self._nodes = [mf.hardware()]
        return self._nodes


def _model(cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": info.get("model", cfg.engine.model),
        "architecture": info.get("architecture"),
        "architecture_hash": (info.get("architecture") or {}).get("hash"),
        "dtype": cfg.engine.dtype,
        "kv_bytes_per_token": info.get("kv_bytes_per_token"),
        "device": info.get("device"),
        "random_weights": info.get("random_weights"),
        # vLLM's per-step budget as it resolved it (its defaults depend on how an engine starts).
        "scheduler": (info.get("extra") or {}).get("scheduler"),
    }


def _cells(cells: dict[str, Any]) -> dict[str, Any]:
    return {
        c: {"status": m.get("status"), "error": m.get("error"), "config_hash": m.get("config_hash"), "nodes": m.get("node_ids")}
        | {"engine": (m.get("engine_use") or {}).get("engine"), "wall_s": m.get("wall_s")}
        # Of wall_s, the wait behind the cell before on its warm engine (the pool's depth 2): not this cell's cost.
        | ({"queued_s": q} if (q := (m.get("engine_use") or {}).get("queued_s")) else {})
        # Where a packet travels without its cells/ (docs/evidence): the engines' start or reset, the
        # load, and the deployment's idle time since the cell before's load (docs/metrics.md).
        | _engine_times(m.get("engine_use") or {})
        | ({"log": m["log"]} if m.get("log") else {})
        for c, m in cells.items()
    }


def _engine_times(use: dict[str, Any]) -> dict[str, Any]:
    keys = ("setup_s", "load_s", "gap_s")
    return {k: round(use[k], 3) for k in keys if isinstance(use.get(k), (int, float))}


def _engine_pool(cfg: ExperimentConfig, serving_modes: list[str], cells: dict[str, Any]) -> dict[str, Any]:
    """Warm engines (docs/metrics.md): engines started over the run, cells that found one warm, and
    how many cells a warm deployment held at once (`depth` 2: the next one's call queued behind the
    running one) with the cells whose call did wait there."""
    uses = [m.get("engine_use") or {} for m in cells.values()]
    return {
        "reuse": not cfg.fresh_engines,
        "pooled_modes": list(POOLED_MODES),
        "depth": pool_depth(not cfg.fresh_engines, serving_modes),
        "engine_starts": sum(u.get("engine_starts", 0) for u in uses),
        "cells_on_warm_engines": sum(u.get("engine") == "reused" for u in uses),
        "cells_queued": sum((u.get("queued_s") or 0.0) > 0 for u in uses),
    }


def run_manifest(facts: RunFacts, serving_modes: list[str], cells: dict[str, Any], status: str) -> dict[str, Any]:
    cfg = facts.cfg
    info: dict[str, Any] = next((c["engine_info"] for c in cells.values() if c.get("engine_info")), {})
    nodes = facts.nodes()
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": facts.run_id,
        "track": cfg.track,
        "config_hash": facts.config_hash,
        "evidence": "simulated" if cfg.simulated else "real",
        "engine": "external" if cfg.target else cfg.engine.kind,
        "target": cfg.target.model_dump(mode="json") if cfg.target else None,
        "serving_modes": serving_modes,
        "model": _model(cfg, info),
        "versions": facts.versions(),
        "hardware": {"summary": nodes[0]["summary"], "nodes": nodes},
        "ray": facts.ray_info,
        "max_concurrent_cells": facts.concurrency,
        "engine_pool": _engine_pool(cfg, serving_modes, cells),
        "seeds": {"config": cfg.seed, "weights": cfg.engine.weight_seed, "cells": {c: m.get("seed") for c, m in cells.items()}},
        "started_at": facts.started_at,
        "resumed_at": facts.resumed_at,
        "ended_at": now() if status != "running" else None,
        "status": status,
        "cells": _cells(cells),
        # Where track-built prompts came from: a dataset subset's ids and their hash (E4).
        "provenance": {c: m["provenance"] for c, m in cells.items() if m.get("provenance")},
    }
