"""Arrival processes: closed loop (N users) and open loop (Poisson, gamma-bursty).

Open-loop schedules are computed up front from the seed, so every request carries its intended
send time and the load generator can report how late it actually sent it (coordinated-omission
guard: a slow server must not silently slow the arrival process down).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ClosedLoop(BaseModel):
    """`concurrency` users, each sending its next request as soon as the previous one finished."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["closed"] = "closed"
    concurrency: int = Field(default=1, ge=1)


class Poisson(BaseModel):
    """Open loop: exponential inter-arrival times with mean 1/rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["poisson"] = "poisson"
    rate: float = Field(gt=0, description="requests per second")


class Gamma(BaseModel):
    """Open loop: gamma inter-arrival times with mean 1/rate and shape `burstiness`.

    burstiness = 1 is Poisson; < 1 is burstier, > 1 more regular (vLLM bench's convention).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gamma"] = "gamma"
    rate: float = Field(gt=0, description="requests per second")
    burstiness: float = Field(default=1.0, gt=0)


Arrival = Annotated[Union[ClosedLoop, Poisson, Gamma], Field(discriminator="kind")]


def schedule(arrival: Arrival, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Intended send offsets (seconds from the start of the measured phase); None for closed loop.

    The first request is sent at t=0; the i-th at the sum of the first i inter-arrival gaps.
    """
    if isinstance(arrival, ClosedLoop):
        return None
    if isinstance(arrival, Poisson):
        gaps = rng.exponential(1.0 / arrival.rate, size=n)
    else:
        shape = arrival.burstiness
        gaps = rng.gamma(shape, 1.0 / (arrival.rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)
