"""E0 — does it run, and does it reproduce? The same small workload twice inside one run."""

from __future__ import annotations

from itertools import pairwise

from pydantic import Field

from workloads.requests import WorkloadSpec
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E0Params(TrackParams):
    repeats: int = Field(default=2, ge=2, description="identical runs of the workload to compare")
    rounds: int = Field(
        default=2,
        ge=1,
        description="slices of each repeat's measured requests; cells run rep0.round0, rep1.round0, rep0.round1, ...",
    )
    tolerance: float = Field(
        default=0.25,
        gt=0,
        lt=1,
        description="largest relative difference of throughput and latency medians between repeats",
    )


def round_slices(num_requests: int, rounds: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) stretches of the measured requests, as even as they divide."""
    edges = [r * num_requests // rounds for r in range(rounds + 1)]
    return list(pairwise(edges))


@register
class E0(Track[E0Params]):
    name = "e0"
    question = "does it run, and does it reproduce?"
    params_model = E0Params
    quick_defaults = {
        "workload": {
            # Enough requests that medians settle on a busy 2-core box (32 left E0 at the 25%
            # tolerance's edge under load); 24 a round in the default 2 rounds. A cell is ~13 s, ~9 s
            # of it the engine start, so fewer requests a round would save little.
            "num_requests": 48,
            "warmup_requests": 8,
            "input_len": {"kind": "uniform", "low": 16, "high": 128},
            "output_len": {"kind": "fixed", "value": 32},
            "arrival": {"kind": "closed", "concurrency": 4},
        }
    }

    def cells(self, workload: WorkloadSpec, params: E0Params) -> list[CellPlan]:
        # Same seed for every repeat: reproducibility means the same requests and the same tokens.
        # Rounds interleave the repeats (rep0.round0, rep1.round0, rep0.round1, ...): a host that
        # gets busier halfway slows every repeat alike instead of the later one.
        if params.rounds == 1:
            return [
                CellPlan(cell_id=f"rep{i}", serving_mode="aggregated", workload=workload, labels={"repeat": i})
                for i in range(params.repeats)
            ]
        if params.rounds > workload.num_requests:
            raise ValueError(
                f"params.rounds: {params.rounds} rounds need at least as many measured requests "
                f"(workload.num_requests is {workload.num_requests}); lower rounds or raise num_requests"
            )
        return [
            CellPlan(
                cell_id=f"rep{i}.round{r}",
                serving_mode="aggregated",
                workload=workload,
                labels={"repeat": i, "round": r},
                measured_slice=part,
            )
            for r, part in enumerate(round_slices(workload.num_requests, params.rounds))
            for i in range(params.repeats)
        ]
