"""Engine adapters: `reference` (torch), `simulated` (analytic law), `vllm` (GPU)."""

from __future__ import annotations

from actors.engines.base import EngineAdapter, EngineInfo, EngineRequest, MemoryReport, TokenDelta
from actors.engines.spec import EngineConfig


def build_engine(cfg: EngineConfig) -> EngineAdapter:
    """The adapter for `cfg.kind`; the model itself is built in `start()`, on the actor's device."""
    from actors.engines.batching import BatchingEngine

    if cfg.kind == "reference":
        from actors.engines.reference import ReferenceModel

        return BatchingEngine(lambda: ReferenceModel(cfg), cfg.max_batch_size)
    if cfg.kind == "simulated":
        from actors.engines.simulated import SimulatedModel

        return BatchingEngine(lambda: SimulatedModel(cfg), cfg.max_batch_size)
    if cfg.kind == "vllm":
        from actors.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    raise ValueError(f"engine.kind must be reference, simulated or vllm, got {cfg.kind!r}")


__all__ = ["EngineAdapter", "EngineConfig", "EngineInfo", "EngineRequest", "MemoryReport", "TokenDelta", "build_engine"]
