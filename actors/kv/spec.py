"""The `kv_transfer:` section of an experiment config: how KV moves between prefill and decode."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KVTransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers_per_group: int = Field(
        default=4,
        ge=1,
        description="layers per object-store object: the decode side fetches group i while the prefill "
        "side still puts group i+1, and no single object holds a long context's whole KV",
    )
    ref_timeout_s: float = Field(
        default=60.0, gt=0, description="longest the decode side waits for a layer group's reference to appear"
    )
    fetch_timeout_s: float = Field(
        default=60.0, gt=0, description="longest the decode side waits for a layer group's bytes to become local"
    )
