"""Chat completions and the output-length fields, without Ray: what peer clients send by default
(`vllm bench serve`, aiperf) is accepted, and what cannot be honoured is refused by name."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from actors.openai_api import (
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    TextStream,
    chat_text,
    check_supported,
    max_new_tokens,
    prompt_ids,
)
from workloads.word_tokenizer import save_word_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_word_tokenizer(tmp_path_factory.mktemp("w"), vocab_size=100))


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "t1 t2 t3"}], **kw})


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], **kw})


def test_max_completion_tokens_is_honoured_and_must_agree_with_max_tokens():
    assert max_new_tokens(completion(max_completion_tokens=3), 3, 64) == 3
    assert max_new_tokens(completion(max_tokens=5), 3, 64) == 5
    assert max_new_tokens(completion(max_tokens=4, max_completion_tokens=4), 3, 64) == 4
    assert max_new_tokens(completion(), 3, 64) == 16  # OpenAI's completions default
    assert max_new_tokens(chat(), 3, 64) == 61  # a chat without a length: the rest of the context
    with pytest.raises(ApiError) as e:
        max_new_tokens(chat(max_tokens=4, max_completion_tokens=5), 3, 64)
    assert e.value.status == 400 and "max_tokens (4)" in e.value.message and "max_completion_tokens (5)" in e.value.message
    with pytest.raises(ApiError) as e:
        max_new_tokens(chat(max_completion_tokens=62), 3, 64)
    assert e.value.param == "max_completion_tokens" and "exceeds" in e.value.message
    with pytest.raises(ApiError) as e:
        max_new_tokens(chat(), 64, 64)
    assert e.value.param == "messages"


def test_chat_messages_need_a_tokenizer_and_join_without_a_template(tok):
    with pytest.raises(ApiError) as e:
        prompt_ids(chat(), None, 100, 64, "tiny-qwen3")
    assert e.value.param == "messages" and "--tokenizer" in e.value.message and "tokenizer build" in e.value.message
    two = chat(messages=[{"role": "system", "content": "t7 t8"}, {"role": "user", "content": [{"type": "text", "text": "t9"}]}])
    assert chat_text(two, tok) == "t7 t8\nt9"
    assert prompt_ids(two, tok, 100, 64, "m") == [7, 8, 9]
    assert prompt_ids(chat(), tok, 100, 64, "m") == [1, 2, 3]


def test_chat_uses_the_tokenizer_template_when_it_has_one(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    templated = AutoTokenizer.from_pretrained(tmp_path)
    templated.chat_template = "{% for m in messages %}t50 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t51{% endif %}"
    assert prompt_ids(chat(), templated, 100, 64, "m") == [50, 1, 2, 3, 51]


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 0.7),
        ("n", 2),
        ("stop", "x"),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_chat_refusals_name_the_field(field, value):
    with pytest.raises(ApiError) as e:
        check_supported(chat(**{field: value}))
    assert e.value.param == field and e.value.status == 400


def test_non_text_content_and_stray_stream_options_are_refused(tok):
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    with pytest.raises(ApiError) as e:
        prompt_ids(image, tok, 100, 64, "m")
    assert e.value.param == "messages[0].content"
    with pytest.raises(ApiError) as e:
        check_supported(chat(stream_options={"include_usage": True}))
    assert e.value.param == "stream_options"


def test_peer_client_default_payloads_are_accepted(tok):
    """The bodies as the clients build them (vLLM 0.26 `vllm/benchmarks/lib/endpoint_request_func.py`,
    aiperf's `endpoints/openai_chat.py`), field for field."""
    vllm_bench_completions = {  # async_request_openai_completions, the default --backend openai
        "model": "m",
        "prompt": "t4 t5 t6",
        "repetition_penalty": 1.0,
        "max_tokens": 8,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    vllm_bench_chat = {  # async_request_openai_chat_completions (--backend openai-chat)
        "model": "m",
        "messages": [{"role": "user", "content": "t4 t5 t6"}],
        "max_completion_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    aiperf_chat = {"messages": [{"role": "user", "content": "t4 t5 t6"}], "model": "m", "stream": False, "max_completion_tokens": 8}
    aiperf_chat_streaming = {**aiperf_chat, "stream": True, "stream_options": {"include_usage": True}}
    for body in (vllm_bench_completions, vllm_bench_chat, aiperf_chat, aiperf_chat_streaming):
        req = (ChatCompletionRequest if "messages" in body else CompletionRequest).model_validate(body)
        check_supported(req)
        ids = prompt_ids(req, tok, 100, 64, "m")
        assert ids == [4, 5, 6] and max_new_tokens(req, len(ids), 64) == 8


def test_text_stream_equals_decoding_the_whole_output(tok):
    ids = [3, 14, 15, 92, 65, 35]
    s = TextStream(tok)
    assert "".join(s.push(ids[i : i + 2], final=i + 2 >= len(ids)) for i in range(0, len(ids), 2)) == tok.decode(ids)
    assert TextStream(None).push([3, 4]) == " 3 4"


def test_chat_chunks_and_whole_response(tok):
    w = ChunkWriter("r", "m", prompt_tokens=3, tokenizer=tok, chat=True)
    first, last = w.chunk([5], False), w.chunk([6, 7], True, server={"prefill_s": 0.1})
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r"
    # The role rides on the first token's chunk, never alone (clients time the first chunk as TTFT).
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "t5"}
    assert last["choices"][0]["delta"] == {"content": " t6 t7"} and last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["token_ids"] == [6, 7] and last["server_timing"] == {"prefill_s": 0.1}
    assert w.usage_chunk() == {**w.usage_chunk(), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    whole = ChunkWriter("r", "m", 3, tok, chat=True).whole([5, 6, 7], None)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "t5 t6 t7"}
    assert whole["usage"]["completion_tokens"] == 3
