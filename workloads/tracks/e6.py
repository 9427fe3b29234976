"""E6 — long context beyond native: a ladder native → ×2 → ×4 with YaRN rope scaling, passkey
retrieval prompts at several depths on every rung, latency and memory per rung.

Rung ×m runs at m × `native_context` tokens with YaRN factor m (×1: the model's own rope): the
smallest factor that covers the rung, as Qwen3's model card advises, since static YaRN costs
quality on shorter texts. The engine is the same model with `hf_overrides`, for the reference
engine and vLLM alike.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveFloat, PositiveInt

from workloads.arrivals import ClosedLoop
from workloads.longcontext import passkey_requests, yarn_rope_parameters
from workloads.requests import WorkloadSpec
from workloads.text import BYT5, get_codec, workload_of
from workloads.tracks.base import CellPlan, Track, TrackParams, register


class E6Params(TrackParams):
    native_context: PositiveInt = Field(
        default=32768, description="the model's pre-trained context (YaRN's original_max_position_embeddings)"
    )
    multipliers: list[PositiveInt] = Field(default=[1, 2, 4], min_length=1, description="rungs, as multiples of native_context")
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default=[0.1, 0.5, 0.9], min_length=1, description="where the key sits in the filler (0 start, 1 end)"
    )
    samples_per_depth: PositiveInt = 3
    max_tokens: PositiveInt = Field(default=8, description="output tokens per request (part of each rung's context)")
    rope_theta: PositiveFloat = Field(default=1000000.0, description="the model's rope_theta (Qwen3: 1e6); YaRN needs it explicitly")
    tokenizer: str = Field(default=BYT5, description="'byt5' (offline byte-level), or the model's tokenizer")
    passkey_seed: int = 0


@register
class E6(Track[E6Params]):
    name = "e6"
    question = "long context beyond native (YaRN)"
    params_model = E6Params
    quick_defaults = {
        "workload": {"warmup_requests": 1, "arrival": {"kind": "closed", "concurrency": 1}},
        "params": {"native_context": 384, "multipliers": [1, 2, 4], "samples_per_depth": 1},
    }

    def cells(self, workload: WorkloadSpec, params: E6Params) -> list[CellPlan]:
        if not isinstance(workload.arrival, ClosedLoop):
            raise ValueError("workload.arrival: E6 sends passkey prompts closed loop; use {kind: closed, concurrency: N}")
        codec = get_codec(params.tokenizer)
        out = []
        for m in params.multipliers:
            context = params.native_context * m
            requests = passkey_requests(
                codec,
                length=context - params.max_tokens,
                depths=params.depths,
                samples_per_depth=params.samples_per_depth,
                max_tokens=params.max_tokens,
                warmup=workload.warmup_requests,
                seed=params.passkey_seed,
                prefix=f"x{m}",
            )
            overrides: dict = {"max_model_len": context}
            if m > 1:
                overrides["hf_overrides"] = yarn_rope_parameters(m, params.native_context, params.rope_theta)
            out.append(
                CellPlan(
                    cell_id=f"x{m}-ctx{context}",
                    serving_mode="aggregated",
                    workload=workload_of(requests, workload.arrival),
                    labels={"multiplier": m, "context": context, "yarn_factor": m if m > 1 else None},
                    engine_overrides=overrides,
                    requests=requests,
                    tokenizer=params.tokenizer,
                )
            )
        return out
