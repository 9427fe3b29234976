"""E3 — aggregated vs disaggregated: the same workload on the same number of engines, both modes."""

from __future__ import annotations

from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register

# A disaggregated pair is two engines (prefill, decode); the aggregated side gets as many.
ENGINES = 2


@register
class E3(Track[TrackParams]):
    name = "e3"
    question = "aggregated vs disaggregated on the same devices: what do latency, throughput and the KV transfer cost?"
    params_model = TrackParams
    quick_defaults = {
        "workload": {
            "num_requests": 24,
            "warmup_requests": 2,
            "input_len": {"kind": "uniform", "low": 32, "high": 512},
            "output_len": {"kind": "fixed", "value": 16},
            "arrival": {"kind": "closed", "concurrency": 4},
        },
        # The tiny model's KV is 1 KiB per layer and token: with 256 KiB objects a 32-token prompt
        # travels as one object and a 512-token one as four, so the transfer really pipelines.
        "kv_transfer": {"max_group_bytes": 256 * 1024},
    }

    def cells(self, workload: WorkloadSpec, params: TrackParams) -> list[CellPlan]:
        # Same workload and seed in both cells: same requests, so greedy tokens must match (oracle).
        return [
            CellPlan(
                cell_id="aggregated",
                serving_mode="aggregated",
                workload=workload,
                labels={"serving_mode": "aggregated", "engines": ENGINES},
                replicas=ENGINES,
            ),
            CellPlan(
                cell_id="disaggregated",
                serving_mode="disaggregated",
                workload=workload,
                labels={"serving_mode": "disaggregated", "engines": ENGINES},
            ),
        ]
