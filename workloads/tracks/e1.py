"""E1 — latency vs lengths at low load: an input × output length grid at concurrency 1.

One request at a time isolates the engine's own prefill and decode cost: TTFT follows the input
length (prefill), TPOT the context the decode steps attend over.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from workloads.arrivals import ClosedLoop
from workloads.lengths import Fixed
from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E1Params(TrackParams):
    input_lens: list[PositiveInt] = Field(default=[128, 512, 2048], min_length=1, description="prompt tokens (grid rows)")
    output_lens: list[PositiveInt] = Field(default=[16, 128], min_length=1, description="output tokens (grid columns)")


@register
class E1(Track[E1Params]):
    name = "e1"
    question = "latency vs lengths at low load"
    params_model = E1Params
    quick_defaults = {
        "workload": {"num_requests": 4, "warmup_requests": 1},
        "params": {"input_lens": [32, 256, 1024], "output_lens": [8, 32]},
    }

    def cells(self, workload: WorkloadSpec, params: E1Params) -> list[CellPlan]:
        return [
            CellPlan(
                cell_id=f"in{i}-out{o}",
                serving_mode="aggregated",
                workload=workload.model_copy(
                    update={"input_len": Fixed(value=i), "output_len": Fixed(value=o), "arrival": ClosedLoop(concurrency=1)}
                ),
                labels={"input_len": i, "output_len": o},
            )
            for i in params.input_lens
            for o in params.output_lens
        ]
