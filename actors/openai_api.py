"""The OpenAI `/v1/completions` protocol as pdbench serves it: request checks and response chunks.

Kept apart from Ray Serve so it can be read and tested alone. pdbench's engines decode greedily and
always produce exactly `max_tokens` tokens (benchmarks need a known output length; `ignore_eos` is
therefore always in effect), so requests asking for sampling, several choices, logprobs or stop
strings are refused with the field named rather than silently served differently.

Prompts are token ids (`prompt: [int, ...]`, as the OpenAI API allows) unless the server was given
a tokenizer; every chunk carries the generated `token_ids` (the field vLLM adds when asked with
`return_token_ids`). Without a tokenizer, `text` spells the ids out (" 17 42"), so clients that
count non-empty text chunks still see every token.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    # Unknown OpenAI/vLLM fields (user, seed, top_p=1, ...) are accepted and ignored: they do not
    # change what greedy decoding of max_tokens tokens produces.
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    stop: str | list[str] | None = None
    best_of: int | None = None
    suffix: str | None = None


def check_supported(req: CompletionRequest) -> None:
    """Refuse what pdbench's engines cannot honour, naming the field."""
    if req.temperature not in (None, 0, 0.0):
        raise ApiError(400, "pdbench engines decode greedily: send temperature 0 or leave it out", "temperature")
    for name, bad in (
        ("n", req.n != 1),
        ("best_of", req.best_of not in (None, 1)),
        ("echo", req.echo),
        ("logprobs", req.logprobs is not None),
        ("stop", bool(req.stop)),
        ("suffix", req.suffix is not None),
    ):
        if bad:
            raise ApiError(
                400, f"{name} is not supported: pdbench engines return exactly max_tokens greedy tokens, one choice", name
            )


def prompt_ids(req: CompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int, model_name: str) -> list[int]:
    """The request's one prompt as token ids, checked against vocabulary and context length."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (list, str)):
        if len(p) != 1:
            raise ApiError(400, f"one prompt per request, got {len(p)}; send them as separate requests", "prompt")
        p = p[0]
    if isinstance(p, str):
        if tokenizer is None:
            raise ApiError(
                400,
                f"text prompts need a tokenizer, and model {model_name!r} is served without one. Send token ids "
                "(\"prompt\": [1, 2, 3]) or start the server with `pdbench serve --tokenizer NAME_OR_PATH` "
                "(a Hugging Face tokenizer folder or hub name).",
                "prompt",
            )
        ids = list(tokenizer.encode(p, add_special_tokens=False))
    else:
        ids = list(p)
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ApiError(400, f"token ids must be in [0, {vocab_size}); got {bad[:5]}", "prompt")
    if len(ids) + req.max_tokens > max_model_len:
        raise ApiError(
            400,
            f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's context of {max_model_len}",
            "max_tokens",
        )
    return ids


def render_text(ids: list[int], tokenizer: Any) -> str:
    if tokenizer is not None:
        return tokenizer.decode(ids)
    return "".join(f" {i}" for i in ids)


class ChunkWriter:
    """Builds the JSON objects of one completion, streamed (SSE `data:` lines) or whole."""

    def __init__(self, request_id: str, model: str, prompt_tokens: int, tokenizer: Any):
        self.id = f"cmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.completion_tokens = 0

    def _obj(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices, **extra}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def choice(self, ids: list[int], finished: bool) -> dict[str, Any]:
        self.completion_tokens += len(ids)
        return {
            "index": 0,
            "text": render_text(ids, self.tokenizer),
            "token_ids": list(ids),
            "logprobs": None,
            "finish_reason": "length" if finished else None,
        }

    def chunk(self, ids: list[int], finished: bool, server: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = {"server_timing": server} if server else {}
        return self._obj([self.choice(ids, finished)], **extra)

    def usage_chunk(self) -> dict[str, Any]:
        return self._obj([], usage=self.usage())

    def whole(self, ids: list[int], server: dict[str, Any] | None) -> dict[str, Any]:
        obj = self._obj([self.choice(ids, True)], usage=self.usage())
        if server:
            obj["server_timing"] = server
        return obj


def sse(obj: dict[str, Any] | Literal["[DONE]"]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"
