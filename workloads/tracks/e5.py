"""E5 — where the memory goes: a context length × concurrency grid, each cell one wave of
`concurrency` requests of `context` tokens (prompt + output) held at once.

The engine reports its measured decomposition (weights, KV cache, activation peak, other);
analysis sets it against the analytic model (parameters × dtype bytes; KV bytes per token ×
tokens) and finds, per context, the largest concurrency that fits the memory budget.
"""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from workloads.arrivals import ClosedLoop
from workloads.lengths import Fixed
from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E5Params(TrackParams):
    contexts: list[PositiveInt] = Field(default=[2048, 8192, 32768], min_length=1, description="tokens per request: prompt + output")
    concurrencies: list[PositiveInt] = Field(default=[1, 8, 32, 128], min_length=1, description="requests held at once")
    output_len: PositiveInt = Field(default=16, description="output tokens per request (part of the context)")
    memory_budget_gib: PositiveFloat | None = Field(
        default=None,
        description="memory one engine may use (GiB) when finding the largest concurrency that fits; "
        "None: the device's memory as the engine reports it",
    )

    @model_validator(mode="after")
    def _room_for_prompt(self) -> E5Params:
        short = [c for c in self.contexts if c <= self.output_len]
        if short:
            raise ValueError(f"contexts {short} leave no prompt: each must exceed output_len ({self.output_len})")
        return self


@register
class E5(Track[E5Params]):
    name = "e5"
    question = "where the memory goes"
    params_model = E5Params
    measures_latency = False  # memory per engine process: cells may share cores
    quick_defaults = {
        "workload": {"warmup_requests": 1},
        "params": {"contexts": [256, 1024, 2048], "concurrencies": [1, 4, 16], "output_len": 8},
    }

    def cells(self, workload: WorkloadSpec, params: E5Params) -> list[CellPlan]:
        return [
            CellPlan(
                cell_id=f"ctx{ctx}-c{c}",
                serving_mode="aggregated",
                workload=workload.model_copy(
                    update={
                        "num_requests": c,
                        "input_len": Fixed(value=ctx - params.output_len),
                        "output_len": Fixed(value=params.output_len),
                        "arrival": ClosedLoop(concurrency=c),
                    }
                ),
                labels={"context": ctx, "concurrency": c},
                # Every request of the wave must be resident at once, or the cell measures less KV.
                engine_overrides={"max_batch_size": c},
            )
            for ctx in params.contexts
            for c in params.concurrencies
        ]
