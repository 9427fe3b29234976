"""E3 — aggregated vs disaggregated: the same workload on the same number of engines, both modes;
and, with `params.backends`, one disaggregated cell per KV transfer backend in the same run."""

from __future__ import annotations

from pydantic import Field, field_validator

from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register

# A disaggregated pair is two engines (prefill, decode); the aggregated side gets as many.
ENGINES = 2


class E3Params(TrackParams):
    backends: list[str] | None = Field(
        default=None,
        description="KV transfer backends to compare, one disaggregated cell each (`disaggregated-<backend>`), "
        "beside the one aggregated cell; unset: one cell `disaggregated` with the config's kv_transfer.backend",
    )

    @field_validator("backends")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and (not names or len(set(names)) != len(names)):
            raise ValueError(f"give each backend once, at least one: {names}")
        return names


def disaggregated_cell(backend: str | None) -> str:
    """The id of the disaggregated cell of `backend` (None: the config's backend, as before E3 compared backends)."""
    return "disaggregated" if backend is None else f"disaggregated-{backend}"


@register
class E3(Track[E3Params]):
    name = "e3"
    question = "aggregated vs disaggregated on the same devices: what do latency, throughput and the KV transfer cost?"
    params_model = E3Params
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

    def cells(self, workload: WorkloadSpec, params: E3Params) -> list[CellPlan]:
        # Same workload and seed in every cell: same requests, so greedy tokens must match (oracle).
        aggregated = CellPlan(
            cell_id="aggregated",
            serving_mode="aggregated",
            workload=workload,
            labels={"serving_mode": "aggregated", "engines": ENGINES},
            replicas=ENGINES,
        )
        disaggregated = [
            CellPlan(
                cell_id=disaggregated_cell(b),
                serving_mode="disaggregated",
                workload=workload,
                labels={"serving_mode": "disaggregated", "engines": ENGINES, **({"kv_backend": b} if b else {})},
                kv_backend=b,
            )
            for b in ([*params.backends] if params.backends else [None])
        ]
        return [aggregated, *disaggregated]
