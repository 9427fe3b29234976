"""Engine adapters: `reference` (torch), `simulated` (analytic law), `vllm` (GPU).

`ENGINES` maps `engine.kind` to a factory; each factory imports its engine only when called, so
torch and vllm load inside the actor that runs the engine, never in the driver.
"""

from __future__ import annotations

from collections.abc import Callable

from actors.engines.base import EngineAdapter, EngineInfo, EngineRequest, MemoryReport, TokenDelta
from actors.engines.spec import EngineConfig
from workloads.registry import Registry


def _reference(cfg: EngineConfig) -> EngineAdapter:
    from actors.engines.batching import BatchingEngine
    from actors.engines.reference import ReferenceModel

    return BatchingEngine(lambda: ReferenceModel(cfg), cfg.max_batch_size)


def _simulated(cfg: EngineConfig) -> EngineAdapter:
    from actors.engines.batching import BatchingEngine
    from actors.engines.simulated import SimulatedModel

    return BatchingEngine(lambda: SimulatedModel(cfg), cfg.max_batch_size)


def _vllm(cfg: EngineConfig) -> EngineAdapter:
    from actors.engines.vllm_engine import VllmEngine

    return VllmEngine(cfg)


ENGINES: Registry[Callable[[EngineConfig], EngineAdapter]] = Registry("engine.kind")
ENGINES.add("reference", _reference)
ENGINES.add("simulated", _simulated)
ENGINES.add("vllm", _vllm)


def build_engine(cfg: EngineConfig) -> EngineAdapter:
    """The adapter for `cfg.kind`; the model itself is built in `start()`, on the actor's device."""
    return ENGINES.get(cfg.kind)(cfg)


__all__ = ["ENGINES", "EngineAdapter", "EngineConfig", "EngineInfo", "EngineRequest", "MemoryReport", "TokenDelta", "build_engine"]
