"""Simulated engine: the same continuous batcher, with sleeps from an analytic law instead of math.

For pipeline debugging and for testing searches against a known answer. Its tokens are a hash of
the prompt, so reproducibility checks still have something to compare; every artifact of a run
that uses it is stamped `evidence: simulated`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from actors.engines.base import EngineInfo, MemoryReport
from actors.engines.models import arch_kv_bytes_per_token, architecture, architecture_hash, resolve_model
from actors.engines.spec import EngineConfig


@dataclass
class SimState:
    seed: int
    n: int


# A pass that starts within this long of the previous one's actual end (the batcher went straight
# on) continues it: the law's clock runs on from the previous pass's due end, so sleep overshoot
# and the batcher's own work are paid back instead of added per step.
_CONTINUES_S = 0.001


class SimulatedModel:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.law = cfg.simulated
        self._end: float | None = None  # when the last pass was due to end, by the law
        self._ended: float | None = None  # when it did end
        raw, _ = resolve_model(cfg.model)
        self.arch = architecture({**(raw or {}), **cfg.hf_overrides})
        self.vocab_size = int(self.arch.get("vocab_size", 32000))

    def info(self) -> EngineInfo:
        kvb = arch_kv_bytes_per_token(self.arch, self.cfg.dtype) if "num_hidden_layers" in self.arch else 0
        return EngineInfo(
            engine="simulated",
            model=self.cfg.model,
            architecture={**self.arch, "hash": architecture_hash(self.arch)},
            vocab_size=self.vocab_size,
            kv_bytes_per_token=kvb,
            device="none",
            dtype=self.cfg.dtype,
            extra={"law": self.law.model_dump()},
            random_weights=True,
        )

    def memory(self) -> MemoryReport:
        """Nothing to measure: the simulator holds no weights and no KV. Analysis may still show
        the analytic model for this architecture, but never as a measurement."""
        return MemoryReport(source="simulated: nothing measured", measured=False, device="none")

    def reset(self) -> None:
        """A new cell's first pass starts on its own clock, never continuing the last cell's."""
        self._end = self._ended = None

    def _take(self, seconds: float) -> None:
        """Hold the engine for `seconds` of the law, counted from the end of the previous pass when
        this one follows straight on: pass k of a busy engine ends at start + the law's sum, exactly
        on average, as a real engine's steps do, instead of drifting by each sleep's overshoot."""
        now = time.monotonic()
        start = self._end if self._end is not None and self._ended is not None and now - self._ended < _CONTINUES_S else now
        self._end = start + seconds
        if self._end > now:
            time.sleep(self._end - now)
        self._ended = time.monotonic()

    def _token(self, state: SimState) -> int:
        h = hashlib.blake2b(f"{state.seed}:{state.n}".encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") % self.vocab_size

    def prefill(self, prompt_token_ids: list[int], capacity: int) -> tuple[int, SimState]:
        self._take(self.law.prefill_fixed_s + self.law.prefill_s_per_token * len(prompt_token_ids))
        seed = int.from_bytes(hashlib.blake2b(repr(prompt_token_ids).encode(), digest_size=8).digest(), "little")
        state = SimState(seed=seed, n=len(prompt_token_ids))
        return self._token(state), state

    def decode(self, states: list[SimState], last_tokens: list[int]) -> list[int]:
        self._take(self.law.decode_fixed_s + self.law.decode_s_per_seq * len(states))
        out = []
        for s in states:
            s.n += 1
            out.append(self._token(s))
        return out
