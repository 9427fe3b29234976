"""Ray Direct Transport with NIXL: pdbench's own KV path, with the bytes kept off the object store.

The sides are the object-store backend's (actors/handoffs/object_store.py for reference engines,
the RayObjectStoreConnector for vLLM): the same pipeline, directory, failure handling and stages.
Only how a layer group travels differs: it is packed on the KV's own device and put with
`ray.put(..., _tensor_transport="nixl")`, so the object store carries NIXL descriptors while the
receiver's `ray.get` reads the bytes with NIXL (UCX: CUDA IPC or NVLink between the GPUs of one
host, RDMA or TCP across hosts, shared memory between CPU processes) onto its own device. This is
the GPU-to-GPU path through Ray's own machinery; its accounting is the object store's, stage by stage.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from actors.handoffs import object_store, vllm_object_store
from actors.handoffs.base import Sides

NAME = "ray-rdt-nixl"


def refusal() -> str | None:
    """Why Ray's NIXL tensor transport cannot start in this process, or None (nixl installed, and
    Ray's NIXL agent starts with a transport backend: UCX, or LIBFABRIC where EFA is present)."""
    if importlib.util.find_spec("nixl") is None:
        return f"{NAME}: nixl is not installed on this node (pip install nixl; the GPU kit carries it)"
    try:
        from ray.experimental.rdt.util import get_tensor_transport_manager

        nixl: Any = get_tensor_transport_manager("NIXL")  # its NIXL class; the declared type is the base
        nixl.get_nixl_agent()
    except Exception as e:  # an agent that does not start says why in one line
        return f"{NAME}: Ray's NIXL transport does not start here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


REFERENCE_SIDES = Sides(prefill=object_store.SIDES.prefill, decode=object_store.SIDES.decode, available=refusal)
VLLM_SIDES = Sides(prefill=vllm_object_store.SIDES.prefill, decode=vllm_object_store.SIDES.decode, available=refusal)
