"""The `engine:` section of an experiment config: which engine, which model, how big a batch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SimulatedLaw(BaseModel):
    """Analytic latency law of the simulated engine (pipeline debugging only).

    prefill time = prefill_fixed_s + prefill_s_per_token × input tokens;
    decode step  = decode_fixed_s + decode_s_per_seq × sequences in the batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefill_fixed_s: float = Field(default=0.002, ge=0)
    prefill_s_per_token: float = Field(default=0.0001, ge=0)
    decode_fixed_s: float = Field(default=0.005, ge=0)
    decode_s_per_seq: float = Field(default=0.0005, ge=0)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["reference", "vllm", "simulated"] = Field(
        default="reference", description="reference (torch), vllm (GPU) or simulated (needs --simulate)"
    )
    model: str = Field(
        default="tiny-qwen3",
        description="'tiny-qwen3' (built locally from a seed), a path to a config.json or model "
        "folder, a configs/models/ name, or a hub name on a connected cluster",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(default=16, ge=1, description="most sequences decoded in one step")
    max_model_len: int = Field(default=2048, ge=16)
    weight_seed: int = Field(default=0, description="seed of random weights (tiny model, dummy load)")
    cpu_threads: int = Field(default=1, ge=1, description="torch intra-op threads on CPU")
    simulated: SimulatedLaw = SimulatedLaw()
    vllm: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments (gpu_memory_utilization, ...)")
    hf_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="top-level fields replacing those of the model's HF config (e.g. rope_parameters for "
        "YaRN); the reference engine applies them to the transformers config, vLLM gets them as hf_overrides",
    )

    @model_validator(mode="after")
    def _meaningful_for_kind(self) -> EngineConfig:
        """An option the chosen engine never reads is refused by name: silently ignored, it would
        make a config (and its hash) claim a setting the run never had."""
        for name, kinds in _ONLY_FOR.items():
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if name in self.model_fields_set and getattr(self, name) != default and self.kind not in kinds:
                raise ValueError(
                    f"{name}: means nothing to engine.kind {self.kind!r} (only to {' or '.join(kinds)}); "
                    f"remove it, or choose an engine that reads it"
                )
        return self


# Options each engine reads; the rest (model, dtype, lengths, batch size, hf_overrides) apply to all.
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm",),
    "simulated": ("simulated",),
    "cpu_threads": ("reference",),
    "device": ("reference",),
    "weight_seed": ("reference", "vllm"),
}
