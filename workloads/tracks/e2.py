"""E2 — throughput–latency under load: closed-loop concurrency sweep, open-loop rate sweep
(Poisson and gamma burstiness), and a bounded search for max-rate goodput.

Rounds (each a deterministic function of the finished cells, so `--resume` replays them):
1. the closed-loop concurrency sweep; its highest request throughput is the measured capacity;
2. the open-loop rate sweep, at absolute `rates` or at `rate_fractions` × capacity, for every
   burstiness (1 = Poisson, < 1 burstier gamma, > 1 more regular);
3. the max-rate goodput search: bisection between `search.low` and `search.high` (absolute, or
   fractions of capacity) on the search's arrival process, one probe per round, until the
   bracket is no wider than the resolution or `max_probes` probes ran. Sweep cells with the same
   arrival process count as probes.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from workloads.arrivals import ClosedLoop, Gamma, Poisson
from workloads.requests import WorkloadSpec
from workloads.search import meets_target, next_rates, round_rate
from workloads.tracks.base import CellOutcome, CellPlan, Track, TrackParams, register


class RateSearch(BaseModel):
    """The max-rate goodput search (`params.search`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    low: PositiveFloat | None = Field(default=None, description="lowest rate probed (req/s); None: low_fraction × capacity")
    high: PositiveFloat | None = Field(default=None, description="highest rate probed (req/s); None: high_fraction × capacity")
    resolution: PositiveFloat | None = Field(
        default=None, description="stop when the bracket is this narrow (req/s); None: resolution_fraction × capacity"
    )
    low_fraction: PositiveFloat = 0.25
    high_fraction: PositiveFloat = 2.0
    resolution_fraction: PositiveFloat = 0.1
    burstiness: PositiveFloat = Field(default=1.0, description="arrival process of the probes: 1 = Poisson, else gamma")
    max_probes: PositiveInt = Field(default=8, description="most search cells (sweep cells not counted)")

    @model_validator(mode="after")
    def _ordered(self) -> RateSearch:
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.low_fraction >= self.high_fraction:
            raise ValueError(f"low_fraction ({self.low_fraction}) must be < high_fraction ({self.high_fraction})")
        return self

    @property
    def absolute(self) -> bool:
        return self.low is not None and self.high is not None and self.resolution is not None


class E2Params(TrackParams):
    concurrencies: list[PositiveInt] = Field(default=[1, 2, 4, 8, 16], description="closed-loop users per cell")
    rates: list[PositiveFloat] | None = Field(
        default=None, description="open-loop request rates (req/s); None: rate_fractions × measured capacity"
    )
    rate_fractions: list[PositiveFloat] = Field(default=[0.25, 0.5, 0.75, 1.0, 1.25])
    burstiness: list[PositiveFloat] = Field(default=[1.0, 0.5], description="rate sweep arrival processes: 1 = Poisson, else gamma")
    search: RateSearch = RateSearch()

    @model_validator(mode="after")
    def _capacity_known(self) -> E2Params:
        relative = self.rates is None or (self.search.enabled and not self.search.absolute)
        if relative and not self.concurrencies:
            raise ValueError(
                "concurrencies is empty, but rates (or the search bounds) are fractions of the capacity "
                "the closed-loop sweep measures: give params.rates and search.low/high/resolution"
            )
        return self


def _arrival(rate: float, burstiness: float):
    return Poisson(rate=rate) if burstiness == 1.0 else Gamma(rate=rate, burstiness=burstiness)


def _arrival_name(burstiness: float) -> str:
    return "poisson" if burstiness == 1.0 else f"gamma{burstiness:g}"


def capacity(done: Mapping[str, CellOutcome]) -> float | None:
    """Highest request throughput any closed-loop cell reached: the rate sweep's unit."""
    vals = [
        o.metrics["request_throughput_rps"]
        for o in done.values()
        if o.ok and o.labels.get("phase") == "closed" and o.metrics and o.metrics.get("request_throughput_rps")
    ]
    return max(vals) if vals else None


def probe_points(done: Mapping[str, CellOutcome], burstiness: float) -> dict[float, bool]:
    """rate → met the target, over finished open-loop cells with this arrival process (sweep and
    search). A failed cell is no evidence either way: it is left out, so the search proposes its
    rate again, the driver sees that cell already ran, and the search stops there (the report
    lists the failure)."""
    return {
        o.labels["rate"]: o.metrics is not None and meets_target(o.metrics["slo_attainment"], o.metrics["slo"]["attainment"])
        for o in done.values()
        if o.ok and o.labels.get("phase") in ("sweep", "search") and o.labels.get("burstiness") == burstiness
    }


@register
class E2(Track[E2Params]):
    name = "e2"
    question = "throughput–latency under load"
    params_model = E2Params
    quick_defaults = {
        "workload": {
            "num_requests": 24,
            "warmup_requests": 2,
            "input_len": {"kind": "uniform", "low": 16, "high": 96},
            "output_len": {"kind": "fixed", "value": 16},
        },
        "slo": {"ttft_s": 0.1, "tpot_s": 0.02, "attainment": 0.9},
        "params": {
            "concurrencies": [1, 4, 8],
            "rate_fractions": [0.5, 1.0, 1.5],
            "burstiness": [1.0, 0.25],
            "search": {"low_fraction": 0.25, "high_fraction": 2.0, "resolution_fraction": 0.25, "max_probes": 4},
        },
    }

    def _open_cell(self, workload: WorkloadSpec, rate: float, burstiness: float, phase: str) -> CellPlan:
        rate = round_rate(rate)
        prefix = "search-" if phase == "search" else ""
        return CellPlan(
            cell_id=f"{prefix}{_arrival_name(burstiness)}-r{rate:g}",
            serving_mode="aggregated",
            workload=workload.model_copy(update={"arrival": _arrival(rate, burstiness)}),
            labels={"phase": phase, "arrival": _arrival_name(burstiness), "burstiness": burstiness, "rate": rate},
        )

    def _sweep(self, workload: WorkloadSpec, rates: list[float], params: E2Params) -> list[CellPlan]:
        return [self._open_cell(workload, r, b, "sweep") for b in params.burstiness for r in rates]

    def cells(self, workload: WorkloadSpec, params: E2Params) -> list[CellPlan]:
        out = [
            CellPlan(
                cell_id=f"closed-c{c}",
                serving_mode="aggregated",
                workload=workload.model_copy(update={"arrival": ClosedLoop(concurrency=c)}),
                labels={"phase": "closed", "concurrency": c},
            )
            for c in params.concurrencies
        ]
        if params.rates is not None:
            out += self._sweep(workload, params.rates, params)
        return out

    def next_cells(self, workload: WorkloadSpec, params: E2Params, done: Mapping[str, CellOutcome]) -> list[CellPlan]:
        cap = capacity(done)
        rates = params.rates if params.rates is not None else [f * cap for f in params.rate_fractions] if cap else []
        sweep = self._sweep(workload, rates, params)
        if any(p.cell_id not in done for p in sweep) or not params.search.enabled:
            return sweep  # the search starts from a finished sweep
        s = params.search
        if s.low is not None and s.high is not None and s.resolution is not None:  # s.absolute, spelled out for the type checker
            low, high, res = s.low, s.high, s.resolution
        elif cap:
            low, high = s.low or s.low_fraction * cap, s.high or s.high_fraction * cap
            res = s.resolution or s.resolution_fraction * cap
        else:
            return sweep  # no capacity measured: every closed-loop cell failed; the report says so
        probes = sum(o.labels.get("phase") == "search" for o in done.values())
        proposals = next_rates(probe_points(done, s.burstiness), low, high, res)[: max(0, s.max_probes - probes)]
        return sweep + [self._open_cell(workload, r, s.burstiness, "search") for r in proposals]
