"""E0 — does it run, and does it reproduce? The same small workload twice inside one run."""

from __future__ import annotations

from pydantic import Field

from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E0Params(TrackParams):
    repeats: int = Field(default=2, ge=2, description="identical runs of the workload to compare")
    tolerance: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="largest relative difference of throughput and latency medians between repeats",
    )


@register
class E0(Track):
    name = "e0"
    question = "does it run, and does it reproduce?"
    params_model = E0Params
    quick_defaults = {
        "workload": {
            # Enough requests that medians settle on a busy 2-core box (32 left E0 at the 25%
            # tolerance's edge under load); still ~10 s a repeat.
            "num_requests": 48,
            "warmup_requests": 8,
            "input_len": {"kind": "uniform", "low": 16, "high": 128},
            "output_len": {"kind": "fixed", "value": 32},
            "arrival": {"kind": "closed", "concurrency": 4},
        }
    }

    def cells(self, workload: WorkloadSpec, params: E0Params) -> list[CellPlan]:
        # Same seed for every repeat: reproducibility means the same requests and the same tokens.
        return [
            CellPlan(cell_id=f"rep{i}", mode="aggregated", workload=workload, labels={"repeat": i})
            for i in range(params.repeats)
        ]
