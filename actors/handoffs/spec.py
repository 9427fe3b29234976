"""The `kv_transfer:` config section with the name of the backend that moves the KV."""

from __future__ import annotations

from pydantic import Field, field_validator

from actors.kv.spec import KVTransferConfig

DEFAULT_BACKEND = "ray-object-store"


class KVHandoffConfig(KVTransferConfig):
    backend: str = Field(
        default=DEFAULT_BACKEND,
        description="the KV transfer backend (actors/handoffs: KV_BACKENDS); 'ray-object-store' moves the KV "
        "through Ray's object store (the reference pair itself, vLLM through its RayObjectStoreConnector)",
    )

    @field_validator("backend")
    @classmethod
    def _known(cls, name: str) -> str:
        from actors.handoffs import KV_BACKENDS

        if name not in KV_BACKENDS:
            raise ValueError(f"unknown KV transfer backend {name!r}; choose one of: {', '.join(KV_BACKENDS.names())}")
        return name

    def tensor_transport(self) -> str | None:
        """How the backend's layer groups travel: None, as bytes in the object store; else the Ray
        Direct Transport that moves them device to device (actors/kv/transport.py)."""
        from actors.handoffs import KV_BACKENDS

        return KV_BACKENDS.get(self.backend).tensor_transport

    def transport(self) -> KVTransferConfig:
        """The transport's own settings, for code that validates them on their own (the vLLM connector)."""
        return KVTransferConfig.model_validate(self.model_dump(include=set(KVTransferConfig.model_fields)))
