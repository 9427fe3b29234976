"""Token-length distributions for synthetic prompts and outputs.

Lengths are drawn from a seeded numpy Generator so that the same spec and seed give the same
lengths on any machine (numpy's PCG64 stream is platform independent).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Dist):
    kind: Literal["fixed"] = "fixed"
    value: int = Field(ge=1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)

    @property
    def upper(self) -> int:
        return self.value


class Uniform(_Dist):
    """Integers uniform on [low, high], both ends included."""

    kind: Literal["uniform"] = "uniform"
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)

    @property
    def upper(self) -> int:
        return self.high


class NormalClipped(_Dist):
    """Normal(mean, std) rounded and clipped to [min, max]: realistic spread without outliers."""

    kind: Literal["normal"] = "normal"
    mean: float = Field(gt=0)
    std: float = Field(ge=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> NormalClipped:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.rint(rng.normal(self.mean, self.std, size=n))
        return np.clip(x, self.min, self.max).astype(np.int64)

    @property
    def upper(self) -> int:
        return self.max


LengthDist = Annotated[Fixed | Uniform | NormalClipped, Field(discriminator="kind")]
