"""The `kv_transfer:` section of an experiment config: how KV moves between prefill and decode."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KVTransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_group_bytes: int = Field(
        default=64 * 2**20,
        ge=1,
        description="most bytes per object-store object: consecutive layers are grouped up to this size "
        "(a larger layer travels alone), so a long context is many objects, fetched one while the next "
        "is put, and no object holds it whole; each object costs about a millisecond of fixed overhead, "
        "so short contexts travel as one",
    )
    ref_timeout_s: float = Field(
        default=60.0, gt=0, description="longest the decode side waits for a layer group's reference to appear"
    )
    fetch_timeout_s: float = Field(
        default=60.0, gt=0, description="longest the decode side waits for a layer group's bytes to become local"
    )
    host_copy_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="threads that copy received KV from object-store memory into pinned buffers before "
        "the host-to-GPU copy (GPU receivers only; one thread reads shared memory at a fraction of the "
        "host's bandwidth)",
    )
