"""The OpenAI `/v1/completions` and `/v1/chat/completions` protocol as pdbench serves it: request
checks and response chunks.

Kept apart from Ray Serve so it can be read and tested alone. pdbench's engines decode greedily and
always produce exactly the requested number of tokens (benchmarks need a known output length;
`ignore_eos` is therefore always in effect), so requests asking for sampling, several choices,
logprobs, stop strings or tools are refused with the field named rather than silently served
differently.

Completion prompts are token ids (`prompt: [int, ...]`, as the OpenAI API allows) unless the server
was given a tokenizer; chat messages always need one. Every chunk carries the generated `token_ids`
(the field vLLM adds when asked with `return_token_ids`). Without a tokenizer, completion `text`
spells the ids out (" 17 42"), so clients that count non-empty text chunks still see every token.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI completions default when neither length field is sent


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, and the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown OpenAI/vLLM fields (user, seed, top_p=1, ignore_eos, ...) are accepted and ignored:
    # they do not change what greedy decoding of a fixed number of tokens produces.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    n: int = 1
    stop: str | list[str] | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def check_supported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse what pdbench's engines cannot honour, naming the field."""
    if req.temperature not in (None, 0, 0.0):
        raise ApiError(400, "pdbench engines decode greedily: send temperature 0 or leave it out", "temperature")
    checks: list[tuple[str, bool]] = [("n", req.n != 1), ("stop", bool(req.stop))]
    if isinstance(req, CompletionRequest):
        checks += [
            ("best_of", req.best_of not in (None, 1)),
            ("echo", req.echo),
            ("logprobs", req.logprobs is not None),
            ("suffix", req.suffix is not None),
        ]
    else:
        checks += [
            ("logprobs", bool(req.logprobs)),
            ("top_logprobs", req.top_logprobs is not None),
            ("tools", bool(req.tools)),
            ("response_format", req.response_format not in (None, {"type": "text"})),
        ]
    for name, bad in checks:
        if bad:
            raise ApiError(400, f"{name} is not supported: pdbench engines return exactly the requested greedy tokens, one choice", name)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, 'stream_options needs "stream": true', "stream_options")


def requested_tokens(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """`max_tokens` or `max_completion_tokens` (the newer name); both sent must agree."""
    a, b = req.max_tokens, req.max_completion_tokens
    if a is not None and b is not None and a != b:
        raise ApiError(400, f"max_tokens ({a}) and max_completion_tokens ({b}) disagree: send one of them", "max_completion_tokens")
    return a if a is not None else b


def max_new_tokens(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int) -> int:
    """Tokens to generate. Without a length, a completion gets OpenAI's 16 and a chat the rest of
    the context (what vLLM does: a chat has no default length of its own)."""
    asked = requested_tokens(req)
    field = "max_completion_tokens" if req.max_tokens is None and req.max_completion_tokens is not None else "max_tokens"
    if asked is None:
        if isinstance(req, CompletionRequest):
            asked = DEFAULT_COMPLETION_TOKENS
        else:
            asked = max_model_len - prompt_len
            if asked < 1:
                raise ApiError(400, f"the messages ({prompt_len} tokens) fill the model's context of {max_model_len}", "messages")
    if prompt_len + asked > max_model_len:
        raise ApiError(400, f"prompt ({prompt_len} tokens) + {field} ({asked}) exceeds the model's context of {max_model_len}", field)
    return asked


def _no_tokenizer(model_name: str, field: str, what: str) -> ApiError:
    return ApiError(
        400,
        f"{what} need a tokenizer, and model {model_name!r} is served without one. Send token ids "
        '("prompt": [1, 2, 3] to /v1/completions) or start the server with `pdbench serve --tokenizer NAME_OR_PATH` '
        "(a Hugging Face tokenizer folder or hub name; `pdbench tokenizer build` makes one offline).",
        field,
    )


def _message_text(i: int, m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"content parts of type {part.type!r} are not supported: send text parts only", f"messages[{i}].content")
        texts.append(part.text)
    return "".join(texts)


def chat_text(req: ChatCompletionRequest, tokenizer: Any) -> str:
    """The messages as one prompt: through the tokenizer's chat template if it has one, else the
    contents joined by newlines (a template-less tokenizer has no other convention to follow)."""
    messages = [{"role": m.role, "content": _message_text(i, m)} for i, m in enumerate(req.messages)]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def prompt_ids(
    req: CompletionRequest | ChatCompletionRequest, tokenizer: Any, vocab_size: int, max_model_len: int, model_name: str
) -> list[int]:
    """The request's one prompt as token ids, checked against vocabulary and context length."""
    if isinstance(req, ChatCompletionRequest):
        if tokenizer is None:
            raise _no_tokenizer(model_name, "messages", "chat messages")
        ids = list(tokenizer.encode(chat_text(req, tokenizer), add_special_tokens=False))
        field = "messages"
    else:
        field = "prompt"
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (list, str)):
            if len(p) != 1:
                raise ApiError(400, f"one prompt per request, got {len(p)}; send them as separate requests", "prompt")
            p = p[0]
        if isinstance(p, str):
            if tokenizer is None:
                raise _no_tokenizer(model_name, "prompt", "text prompts")
            ids = list(tokenizer.encode(p, add_special_tokens=False))
        else:
            ids = list(p)
    if not ids:
        raise ApiError(400, f"the {field} is empty", field)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ApiError(400, f"token ids must be in [0, {vocab_size}); got {bad[:5]}", field)
    max_new_tokens(req, len(ids), max_model_len)
    return ids


class TextStream:
    """Incremental detokenisation: each delta's text is what decoding the whole output so far adds.

    Decoding a delta alone loses the spaces a tokenizer puts between tokens, and a byte-level
    tokenizer may need the next token to finish a character; so a short window of earlier tokens
    is decoded with the new ones, and text ending in a partial character waits for the next delta.
    """

    WINDOW = 6

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.done: list[int] = []  # ids whose text was emitted
        self.pending: list[int] = []

    def push(self, ids: list[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return "".join(f" {i}" for i in ids)
        self.pending += ids
        ctx = self.done[-self.WINDOW :]
        before = self.tokenizer.decode(ctx) if ctx else ""
        after = self.tokenizer.decode(ctx + self.pending)
        if after.endswith("\ufffd") and not final:
            return ""
        self.done += self.pending
        self.pending = []
        return after[len(before) :] if after.startswith(before) else after


class ChunkWriter:
    """Builds the JSON objects of one completion or chat completion, streamed (SSE `data:` lines) or whole."""

    def __init__(self, request_id: str, model: str, prompt_tokens: int, tokenizer: Any, chat: bool = False):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.text = TextStream(tokenizer)
        self.completion_tokens = 0

    def _obj(self, choices: list[dict[str, Any]], whole: bool, **extra: Any) -> dict[str, Any]:
        kind = ("chat.completion" if whole else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def choice(self, ids: list[int], finished: bool, whole: bool = False) -> dict[str, Any]:
        first = self.completion_tokens == 0
        self.completion_tokens += len(ids)
        text = self.text.push(ids, final=finished)
        c: dict[str, Any] = {"index": 0}
        if not self.chat:
            c["text"] = text
        elif whole:
            c["message"] = {"role": "assistant", "content": text}
        else:
            # The role rides on the first token's chunk: a role-only chunk ahead of it would be
            # timed as the first token by clients that take any chunk with choices as TTFT.
            c["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        c.update(token_ids=list(ids), logprobs=None, finish_reason="length" if finished else None)
        return c

    def chunk(self, ids: list[int], finished: bool, server: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = {"server_timing": server} if server else {}
        return self._obj([self.choice(ids, finished)], False, **extra)

    def usage_chunk(self) -> dict[str, Any]:
        return self._obj([], False, usage=self.usage())

    def whole(self, ids: list[int], server: dict[str, Any] | None) -> dict[str, Any]:
        obj = self._obj([self.choice(ids, True, whole=True)], True, usage=self.usage())
        if server:
            obj["server_timing"] = server
        return obj


def render_text(ids: list[int], tokenizer: Any) -> str:
    return TextStream(tokenizer).push(ids, final=True)


def sse(obj: dict[str, Any] | Literal["[DONE]"]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"
