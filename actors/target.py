"""The `target:` section of a config: an OpenAI-compatible server to benchmark instead of engines.

Kept apart from the HTTP client (actors/openai_client.py) so that validating a config imports no
HTTP library.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TargetSpec(BaseModel):
    """The `target:` section of a config: benchmark this server instead of starting engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(description="server root, e.g. http://127.0.0.1:8000 (the /v1/completions path is added)")
    model: str = Field(description="the `model` field sent with each request")
    vocab_size: int = Field(gt=1, description="prompt token ids are drawn below this (the model's vocabulary size)")
    api_key_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the API key (the key itself never goes in a config)",
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="longest silence of the server within one request (no byte) before the request fails; "
        "bounds a server that accepts and never replies even with request_timeout_s null",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        if url.username or url.password or url.query or url.fragment:
            # A key in a URL would be written into config.yaml and the manifest with it.
            raise ValueError("must not carry credentials, a query or a fragment; put the key in api_key_env")
        return v.rstrip("/")
