"""The `kv_transfer:` section of an experiment config: how KV moves between prefill and decode."""

from __future__ import annotations

from typing import Literal

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
    ref_timeout_s: float = Field(default=60.0, gt=0, description="longest the decode side waits for a layer group's reference to appear")
    fetch_timeout_s: float = Field(
        default=60.0, gt=0, description="longest the decode side waits for a layer group's bytes to become local"
    )
    put_threads: int = Field(
        default=1,
        ge=1,
        le=16,
        description="layer groups one sender puts into the object store at once. Each put has a fixed cost "
        "(creating and sealing the object) besides its copy; with more than one, device-to-host copies run "
        "ahead into as many pinned staging buffers (one per group in flight)",
    )
    put_process: bool = Field(
        default=False,
        description="object-store senders: write each layer group into the object store from a putter process "
        "of the sender's own (a Ray actor on its node, actors/kv/putter.py) instead of from the engine's process, "
        "whose step loop a ray.put stalls while it copies under the GIL; the group is packed into shared memory "
        "both map (registered with CUDA on a GPU) and the object stays owned by the engine's process. Off until "
        "a GPU run shows it pays; put_s then includes the call to the putter",
    )
    host_copy_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="threads that copy received KV from object-store memory into pinned buffers before "
        "the host-to-GPU copy (GPU receivers only; one thread reads shared memory at a fraction of the "
        "host's bandwidth)",
    )
    worker_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="threads per vLLM engine that run the connector's loads and saves off the engine step "
        "(a load waiting for its producer holds one; more transfers than threads queue, measured as queued_s)",
    )
    checksum: bool = Field(
        default=True,
        description="compare a checksum of each layer group's KV on the sender with the blocks it landed in "
        "(with random weights the token oracle cannot see wrong KV; costs a few ms per GB on a GPU)",
    )
    host_to_device: Literal["registered", "staged"] = Field(
        default="registered",
        description="how a GPU receiver copies KV out of the object store: 'registered' pins the store's "
        "shared-memory mapping with CUDA once per process and DMAs straight from each object; 'staged' "
        "copies through pinned buffers with host_copy_threads threads (also the fallback for objects outside "
        "the mapping)",
    )
    decode_submit: Literal["after_prefill", "with_prefill"] = Field(
        default="after_prefill",
        description="vLLM pairs: when the decode actor hands a request to its engine. 'after_prefill': once "
        "the prefill engine has answered; 'with_prefill': at once, beside the prefill call, so the request "
        "waits in the decode engine for its KV and the transfer overlaps the prefill and the reply's hop "
        "(its decode blocks are held meanwhile). The reference pair moves KV itself after the prefill and "
        "refuses 'with_prefill'",
    )
    save: Literal["after_forward", "layerwise"] = Field(
        default="after_forward",
        description="vLLM producers: when a prompt's KV starts its way out. 'after_forward': once the forward "
        "pass that completed the prompt has run; 'layerwise': during that pass, each layer's blocks gathered "
        "as soon as the layer wrote them and each layer group copied and put once its last layer is done, so "
        "only the last group's path is left when the pass ends (the prefill engine's CUDA graphs become "
        "piecewise, as vLLM requires of layer-by-layer connectors)",
    )
    rdt_pool_bytes: int = Field(
        default=2 * 2**30,
        ge=2**20,
        description="kv_transfer.backend ray-rdt-nixl: the memory each sender registers with NIXL once, on its KV's "
        "device (a GPU, or host memory for CPU engines), that layer groups are copied into until their receiver "
        "took them; a put waits while it is full. Registering each buffer on its own, as before, failed every "
        "8K-token transfer on 2x H200",
    )
    gil_switch_interval_ms: float = Field(
        default=0.5,
        gt=0,
        le=5,
        description="vLLM engines with the connector: Python's thread switch interval in the engine process. "
        "The connector's threads launch many small GPU operations; under Python's default 5 ms a busy one "
        "can hold the engine's step loop that long",
    )
