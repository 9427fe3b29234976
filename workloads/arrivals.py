"""Arrival processes: closed loop (N users) and open loop (Poisson, gamma-bursty).

Open-loop schedules are computed up front from the seed, so every request carries its intended
send time and the load generator can report how late it actually sent it (coordinated-omission
guard: a slow server must not silently slow the arrival process down).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class SteadyState(BaseModel):
    """Which part of a cell's measured phase counts as steady state: the requests sent after the
    first `ramp_up` and before the last `cool_down` share of the send span (the queue fills at
    the start of an open loop and drains at its end). Analysis only: it never changes what runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ramp_up: float = Field(default=0.1, ge=0, lt=1, description="share of the send span left out at the start")
    cool_down: float = Field(default=0.1, ge=0, lt=1, description="share of the send span left out at the end")

    @model_validator(mode="after")
    def _leaves_a_window(self) -> SteadyState:
        if self.ramp_up + self.cool_down >= 1:
            raise ValueError(f"ramp_up + cool_down must be below 1 (got {self.ramp_up} + {self.cool_down}): nothing would be left")
        return self


Arrival = Annotated[ClosedLoop | Poisson | Gamma, Field(discriminator="kind")]


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


# Longest an open-loop schedule may span: a rate so low that the requests go out over days is a
# typo (a rate per minute given per second), and would leave a run waiting with no message.
MAX_SCHEDULE_S = 6 * 3600.0


def schedule_problem(arrival: Arrival, n: int) -> str | None:
    """Why n requests at this arrival rate cannot be scheduled in a run, or None."""
    if isinstance(arrival, ClosedLoop):
        return None
    span = n / arrival.rate
    if span <= MAX_SCHEDULE_S:
        return None
    return (
        f"{n} requests at {arrival.rate:g} req/s would be sent over about {span / 3600:.1f} h, more than the "
        f"{MAX_SCHEDULE_S / 3600:g} h a run may schedule; raise the rate or send fewer requests"
    )
