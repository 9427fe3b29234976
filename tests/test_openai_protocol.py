"""The completions protocol without Ray: request checks, text prompts, and the HTTP backend's SSE
parsing against servers that behave like vLLM (ids), like text-only servers, and like broken ones."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from actors.backends import Exchange
from actors.metrics import tags_from_actor_name
from actors.openai_api import (
    ApiError,
    ChunkWriter,
    CompletionRequest,
    check_supported,
    prompt_ids,
    render_text,
    sse,
)
from actors.openai_client import OpenAIBackend, completion_body, sse_events
from actors.target import TargetSpec

TARGET = TargetSpec(base_url="http://127.0.0.1:9/", model="m", vocab_size=100)


def _req(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], **kw})


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 0.8), ("n", 2), ("best_of", 3), ("echo", True), ("logprobs", 1), ("stop", ["\n"]), ("suffix", "x")],
)
def test_unsupported_fields_are_refused_by_name(field, value):
    with pytest.raises(ApiError) as e:
        check_supported(_req(**{field: value}))
    assert e.value.param == field and e.value.status == 400


def test_greedy_and_extra_fields_are_accepted():
    check_supported(_req(temperature=0, top_p=1.0, seed=3, ignore_eos=False, repetition_penalty=1.0))


def test_prompt_forms():
    assert prompt_ids(_req(prompt=[[4, 5]]), None, 100, 64, "m") == [4, 5]
    with pytest.raises(ApiError, match="one prompt per request"):
        prompt_ids(_req(prompt=[[1], [2]]), None, 100, 64, "m")
    with pytest.raises(ApiError, match="empty"):
        prompt_ids(_req(prompt=[]), None, 100, 64, "m")
    with pytest.raises(ApiError, match=r"\[0, 100\)"):
        prompt_ids(_req(prompt=[1, 100]), None, 100, 64, "m")
    with pytest.raises(ApiError) as e:
        prompt_ids(_req(prompt=[1] * 60, max_tokens=5), None, 100, 64, "m")
    assert e.value.param == "max_tokens"


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A real Hugging Face tokenizer made locally (nothing to download)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "pdbench", "serves"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_text_prompts_need_a_tokenizer_and_work_with_one(word_tokenizer):
    with pytest.raises(ApiError) as e:
        prompt_ids(_req(prompt="hello world"), None, 100, 64, "tiny-qwen3")
    assert "tokenizer" in e.value.message and "--tokenizer" in e.value.message and "tiny-qwen3" in e.value.message
    assert prompt_ids(_req(prompt="hello world"), word_tokenizer, 100, 64, "m") == [1, 2]
    assert prompt_ids(_req(prompt=["pdbench serves"]), word_tokenizer, 100, 64, "m") == [3, 4]
    assert render_text([3, 4], word_tokenizer) == "pdbench serves"
    assert render_text([3, 4], None) == " 3 4"


def test_chunks_count_usage():
    w = ChunkWriter("r1", "m", prompt_tokens=3, tokenizer=None)
    first = w.chunk([7], finished=False)
    last = w.chunk([8, 9], finished=True, server={"prefill_s": 0.1})
    assert first["choices"][0]["finish_reason"] is None and last["choices"][0]["finish_reason"] == "length"
    assert last["server_timing"] == {"prefill_s": 0.1}
    assert w.usage_chunk()["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(sse(first)[6:]) == first


def _stream(handler, api_key=None, ex: Exchange | None = None) -> list[dict]:
    """Stream one request from a loopback server whose reply is `handler(body, headers)` →
    (status, bytes)."""

    async def go():
        async def reply(request: web.Request) -> web.Response:
            status, content = handler(await request.json(), request.headers)
            return web.Response(status=status, body=content, content_type="text/event-stream" if status == 200 else "application/json")

        app = web.Application()
        app.router.add_post("/v1/completions", reply)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        b = OpenAIBackend(TARGET.model_copy(update={"base_url": f"http://127.0.0.1:{port}"}), api_key)
        try:
            return [d async for d in b.stream({"request_id": "r", "prompt_token_ids": [1, 2], "max_tokens": 3}, ex)]
        finally:
            await b.aclose()
            await runner.cleanup()

    return asyncio.run(go())


def _sse_response(*objs) -> tuple[int, bytes]:
    return 200, "".join(sse(o) for o in objs).encode()


def test_backend_sends_token_ids_greedy_and_parses_ids():
    seen = {}

    def handler(body, headers):
        seen["body"] = body
        seen["auth"] = headers.get("authorization")
        return _sse_response(
            {"choices": [{"index": 0, "text": "a", "token_ids": [5]}]},
            {"choices": [{"index": 0, "text": "bc", "token_ids": [6, 7], "finish_reason": "length"}], "server_timing": {"prefill_s": 0.2}},
            {"choices": [], "usage": {"completion_tokens": 3}},
            "[DONE]",
        )

    ex = Exchange()
    deltas = _stream(handler, api_key="k-123", ex=ex)
    assert seen["body"] == completion_body(TARGET, {"prompt_token_ids": [1, 2], "max_tokens": 3})
    assert seen["body"]["prompt"] == [1, 2] and seen["body"]["temperature"] == 0.0 and seen["body"]["stream"] is True
    assert seen["auth"] == "Bearer k-123"
    assert [d["token_ids"] for d in deltas] == [[5], [6, 7], []]
    assert deltas[-1]["finished"] and deltas[-1]["error"] is None and deltas[-1]["server"] == {"prefill_s": 0.2}
    # Sent when the headers reached the socket, after the client's own work, before any reply.
    assert 0 < ex.client_send_s < 1 and ex.t_sent < deltas[0]["t_recv"] <= deltas[1]["t_recv"]


def test_backend_counts_text_only_chunks_as_one_token_each():
    deltas = _stream(
        lambda body, headers: _sse_response(
            {"choices": [{"index": 0, "text": "He"}]},
            {"choices": [{"index": 0, "text": ""}]},
            {"choices": [{"index": 0, "text": "llo"}]},
            "[DONE]",
        )
    )
    assert [d["token_ids"] for d in deltas] == [[-1], [-1], []]


def test_backend_reports_http_and_stream_errors():
    d = _stream(lambda body, headers: (400, json.dumps({"error": {"message": "bad prompt"}}).encode()))
    assert len(d) == 1 and d[0]["finished"] and d[0]["error"].startswith("HTTP 400") and "bad prompt" in d[0]["error"]
    d = _stream(lambda body, headers: _sse_response({"choices": [{"index": 0, "token_ids": [1]}]}, {"error": {"message": "engine died"}}))
    assert d[-1]["finished"] and "engine died" in d[-1]["error"]


def test_sse_events_split_per_read_across_boundaries_and_line_endings():
    events, rest = sse_events(b'data: {"a": 1}\n\ndata: {"b"')
    assert events == ['{"a": 1}'] and rest == b'data: {"b"'
    events, rest = sse_events(rest + b": 2}\r\n\r\n: comment\n\ndata:[DONE]\n\n")
    assert events == ['{"b": 2}', "[DONE]"] and rest == b""
    assert sse_events(b"data: x\ndata: y\n\n") == (["x\ny"], b"")


def test_target_refuses_credentials_in_url():
    with pytest.raises(ValueError, match="api_key_env"):
        TargetSpec(base_url="http://user:pw@127.0.0.1:8000", model="m", vocab_size=10)
    with pytest.raises(ValueError, match="query"):
        TargetSpec(base_url="http://127.0.0.1:8000/?api_key=abcdef0123456789", model="m", vocab_size=10)
    with pytest.raises(ValueError, match="http"):
        TargetSpec(base_url="ftp://127.0.0.1", model="m", vocab_size=10)


def test_metric_tags_come_from_the_actor_name():
    assert tags_from_actor_name("pdbench:e0-1:rep0:loadgen", "x") == {"run": "e0-1", "cell": "rep0", "role": "loadgen"}
    assert tags_from_actor_name(None, "engine") == {"run": "unknown", "cell": "unknown", "role": "engine"}
