"""What every cell runner gets and gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from actors.engines import EngineConfig
from cluster.config import ExperimentConfig
from workloads.tracks import CellPlan

ENGINE_START_TIMEOUT_S = 900.0


@dataclass
class CellContext:
    run_id: str
    cfg: ExperimentConfig
    plan: CellPlan
    engine: EngineConfig
    seed: int
    progress: Any  # ProgressCounter actor handle

    def name(self, role: str) -> str:
        from actors.engine_actor import actor_name

        return actor_name(self.run_id, self.plan.cell_id, role)

    def strategy(self, bundles: int) -> str:
        """Ray placement strategy for a cell of several engine bundles: `placement.strategy` PACK
        keeps them on one node, SPREAD puts each on its own node (refused at once, naming the field,
        where the cluster has too few nodes, instead of waiting for a placement that never comes)."""
        if bundles == 1 or self.cfg.placement.strategy == "PACK":
            return "STRICT_PACK"
        import ray

        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive < bundles:
            raise RuntimeError(
                f"placement.strategy: SPREAD puts each of this cell's {bundles} engines on its own node, "
                f"but the cluster has {alive} node(s); use PACK"
            )
        return "STRICT_SPREAD"

    def engine_bundle(self) -> dict[str, float]:
        b: dict[str, float] = {"CPU": self.cfg.placement.cpus_per_engine}
        if self.cfg.gpus_per_engine():
            b["GPU"] = float(self.cfg.gpus_per_engine())
        return b


@dataclass
class CellResult:
    requests: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    transfers: pd.DataFrame | None = None
