"""Synthetic request streams: token-id prompts with seeded lengths and seeded arrival times."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workloads.arrivals import Arrival, ClosedLoop, SteadyState, schedule, schedule_problem
from workloads.lengths import Fixed, LengthDist

# Separate numpy streams per purpose: changing the arrival process must not change the prompts.
_STREAM_LENGTHS, _STREAM_TOKENS, _STREAM_ARRIVALS = 1, 2, 3


class WorkloadSpec(BaseModel):
    """What one cell asks of its engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_requests: int = Field(default=16, ge=1)
    warmup_requests: int = Field(default=2, ge=0)
    input_len: LengthDist = Fixed(value=32)
    output_len: LengthDist = Fixed(value=16)
    arrival: Arrival = ClosedLoop(concurrency=4)
    steady_state: SteadyState = SteadyState()

    @model_validator(mode="after")
    def _bounded_schedule(self) -> WorkloadSpec:
        problem = schedule_problem(self.arrival, self.num_requests)
        if problem:
            raise ValueError(f"arrival.rate: {problem}")
        return self


@dataclass(frozen=True)
class RequestSpec:
    """One request as the load generator will send it.

    `t_scheduled` is the intended send offset for open-loop arrivals (None: closed loop, the
    request goes out when a user is free). `meta` carries what a scorer needs later (answers).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    warmup: bool = False
    t_scheduled: float | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PackedRequests:
    """A cell's requests as one pickle, opened by the load generator when the cell's turn comes. A
    cell handed to a busy warm engine waits in the load generator behind the running cell
    (cluster/cells/engine_pool.py, `depth`): its arrival then costs that cell's measured phase a
    copy of bytes, not the unpickling of every prompt under the GIL."""

    blob: bytes

    @classmethod
    def of(cls, requests: list[RequestSpec]) -> PackedRequests:
        return cls(pickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL))

    def unpack(self) -> list[RequestSpec]:
        return list(pickle.loads(self.blob))  # made by this run's driver (PackedRequests.of)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def synthetic_requests(spec: WorkloadSpec, vocab_size: int, seed: int) -> list[RequestSpec]:
    """Warm-up requests first, then the measured ones; same (spec, vocab, seed) → same list."""
    total = spec.warmup_requests + spec.num_requests
    lrng = _rng(seed, _STREAM_LENGTHS)
    in_lens = spec.input_len.sample(lrng, total)
    out_lens = spec.output_len.sample(lrng, total)
    trng = _rng(seed, _STREAM_TOKENS)
    offsets = schedule(spec.arrival, spec.num_requests, _rng(seed, _STREAM_ARRIVALS))
    out: list[RequestSpec] = []
    for i in range(total):
        warm = i < spec.warmup_requests
        ids = trng.integers(0, vocab_size, size=int(in_lens[i]), dtype=np.int64)
        j = i - spec.warmup_requests
        out.append(
            RequestSpec(
                request_id=f"w{i:04d}" if warm else f"r{j:05d}",
                prompt_token_ids=tuple(ids.tolist()),  # Python ints, 7x faster than int() per item
                max_tokens=int(out_lens[i]),
                warmup=warm,
                t_scheduled=None if (warm or offsets is None) else float(offsets[j]),
            )
        )
    return out
