"""KV transfer backends, by the name `kv_transfer.backend` gives.

Each backend maps the engine kinds it serves to the two sides of the KV-handoff interface
(actors/handoffs/base.py). Its sides load only when a pair's actor asks for them, so torch and
vLLM stay out of the driver. Adding a backend: its module under actors/handoffs/ and one
`KV_BACKENDS.add` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workloads.registry import Registry

if TYPE_CHECKING:
    from actors.handoffs.base import Sides


@dataclass(frozen=True)
class KVBackend:
    engines: Mapping[str, Callable[[], Sides]]  # engine.kind → loader of its prefill and decode sides
    # pdbench's own transport only: None moves layer groups as object-store bytes, "nixl" by Ray
    # Direct Transport (the same sides, accounting and stages; actors/kv/transport.py)
    tensor_transport: str | None = None

    def check(self, name: str, kind: str) -> None:
        problem = self.serves(name, kind)
        if problem:
            raise ValueError(problem)

    def serves(self, name: str, kind: str) -> str | None:
        """Why this backend cannot move the KV of `kind` engines (one line), or None."""
        if kind not in self.engines:
            return f"engine.kind: the {name} KV backend moves the KV of {' or '.join(sorted(self.engines))} engines, not {kind!r}"
        return None


def _object_store_reference() -> Sides:
    from actors.handoffs.object_store import SIDES

    return SIDES


def _object_store_vllm() -> Sides:
    from actors.handoffs.vllm_object_store import SIDES

    return SIDES


def _rdt_reference() -> Sides:
    from actors.handoffs.rdt import REFERENCE_SIDES

    return REFERENCE_SIDES


def _rdt_vllm() -> Sides:
    from actors.handoffs.rdt import VLLM_SIDES

    return VLLM_SIDES


def _nixl_vllm() -> Sides:
    from actors.handoffs.nixl_vllm import SIDES

    return SIDES


KV_BACKENDS: Registry[KVBackend] = Registry("kv_transfer.backend")
KV_BACKENDS.add("ray-object-store", KVBackend({"reference": _object_store_reference, "vllm": _object_store_vllm}))
KV_BACKENDS.add("nixl-vllm", KVBackend({"vllm": _nixl_vllm}))
KV_BACKENDS.add("ray-rdt-nixl", KVBackend({"reference": _rdt_reference, "vllm": _rdt_vllm}, tensor_transport="nixl"))


def check_backend(backend: str, kind: str) -> None:
    """Fail in one line, in the driver before any actor starts, where `backend` cannot serve `kind`."""
    KV_BACKENDS.get(backend).check(backend, kind)


def backend_sides(backend: str, kind: str) -> Sides:
    """The two sides `backend` runs for engines of `kind` (imports them: call it inside the actor)."""
    check_backend(backend, kind)
    return KV_BACKENDS.get(backend).engines[kind]()


def refusal(backend: str, kind: str) -> str | None:
    """Why `backend` cannot run for `kind` engines where this is called (the engine kind, then what
    the backend itself needs: a library, a device, a transport), in one line; None where it can.
    Call it on the machine of the pair's engines: it imports the backend's sides."""
    problem = KV_BACKENDS.get(backend).serves(backend, kind)
    return problem if problem else backend_sides(backend, kind).available()
