"""Issue 28: Ollama requests as the OpenAI bodies they mean, and answers and streams back."""

from __future__ import annotations

import json
import math

import pytest

from appliance.api.ollama_schema import (
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Timing,
    chat_answer,
    chat_body,
    done_reason,
    embed_body,
    error_message,
    generate_body,
    keep_alive_seconds,
    model_name,
    parse,
    response_format_of,
    sampling_of,
)
from appliance.api.ollama_stream import StreamTranslator
from appliance.engines.base import Usage
from appliance.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        (-1, math.inf),
        ("-1", math.inf),
        ("-1m", math.inf),
    ],
)
def test_keep_alive_durations(value: float | str | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "", "1d", True, float("nan")])
def test_keep_alive_refuses_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(InvalidRequestError):
        keep_alive_seconds(value)  # type: ignore[arg-type]


def test_options_map_to_vllm_sampling() -> None:
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 7,
        "stop": ["\n"],
        "num_predict": 12,
        "repeat_penalty": 1.1,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.4,
        "num_ctx": 4096,  # llama.cpp's; ignored
        "mirostat": 2,
    }
    assert sampling_of(options) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "seed": 7,
        "stop": ["\n"],
        "max_tokens": 12,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.4,
    }
    assert sampling_of({"num_predict": -1}) == {}
    assert sampling_of(None) == {}


def test_format() -> None:
    assert response_format_of(None) is None and response_format_of("") is None
    assert response_format_of("json") == {"type": "json_object"}
    schema = {"type": "object"}
    assert response_format_of(schema) == {
        "type": "json_schema",
        "json_schema": {"name": "format", "schema": schema},
    }
    with pytest.raises(InvalidRequestError):
        response_format_of("yaml")


def test_chat_body() -> None:
    req = parse(
        ChatRequest,
        {
            "model": "m:latest",
            "messages": [
                {"role": "user", "content": "look", "images": ["QUJD"]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
                },
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
            "options": {"num_predict": 3},
            "format": "json",
            "keep_alive": "5m",
            "unknown_field": 1,
        },
    )
    body = chat_body(req)
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 3 and body["response_format"] == {"type": "json_object"}
    assert "keep_alive" not in body
    user, assistant, tool = body["messages"]
    assert user["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
    ]
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert tool["tool_call_id"] == "call_0" and "tool_name" not in tool


def test_bad_fields_are_400_naming_them() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse(ChatRequest, {"model": "m", "messages": "hi"})
    assert caught.value.param == "messages"
    with pytest.raises(InvalidRequestError):
        chat_body(parse(ChatRequest, {"model": "m", "messages": [{"content": "x"}]}))
    with pytest.raises(InvalidRequestError):
        parse(ChatRequest, {"messages": []})


def test_generate_body_raw_and_templated() -> None:
    route, body = generate_body(
        parse(GenerateRequest, {"model": "m", "prompt": "hi", "raw": True, "stream": False})
    )
    assert route == "completions" and body["prompt"] == "hi" and "stream_options" not in body
    route, body = generate_body(
        parse(GenerateRequest, {"model": "m", "prompt": "hi", "system": "be brief"})
    )
    assert route == "chat"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_embed_body() -> None:
    body = embed_body(parse(EmbedRequest, {"model": "e", "input": ["a", "b"], "dimensions": 8}))
    expected = {"model": "e", "input": ["a", "b"], "truncate_prompt_tokens": -1, "dimensions": 8}
    assert body == expected
    body = embed_body(parse(EmbedRequest, {"model": "e", "input": "a", "truncate": False}))
    assert "truncate_prompt_tokens" not in body


def test_chat_answer() -> None:
    reply = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    answer = chat_answer("m", reply, Timing(), Usage(5, 2))
    assert answer["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
    }
    assert answer["done"] is True and answer["done_reason"] == "stop"
    assert answer["prompt_eval_count"] == 5 and answer["eval_count"] == 2
    assert answer["created_at"].endswith("Z") and answer["total_duration"] >= 0


def test_done_reason_and_errors() -> None:
    assert done_reason("length") == "length" and done_reason(None) == "stop"
    assert error_message(b'{"error": {"message": "bad"}}') == "bad"
    assert error_message(b'{"object": "error", "message": "worse"}') == "worse"
    assert error_message(b"plain") == "plain"
    assert model_name("a:latest") == "a" and model_name("a:v2") == "a:v2"


def _events(*events: object) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def test_stream_chat_lines() -> None:
    translator = StreamTranslator("chat", "m", Timing())
    chunks = _events(
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    )
    # An event cut across chunks is put together first.
    joined = b"".join(chunks)
    lines = [json.loads(line) for c in (joined[:17], joined[17:]) for line in translator.feed(c)]
    lines += [json.loads(line) for line in translator.finish()]
    assert [x["message"]["content"] for x in lines] == ["Hel", "lo", ""]
    assert [x["done"] for x in lines] == [False, False, True]
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 2
    assert translator.usage == Usage(4, 2)


def test_stream_gathers_tool_calls_and_generate_text() -> None:
    translator = StreamTranslator("chat", "m", Timing())
    lines: list[bytes] = []
    for chunk in _events(
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]},
    ):
        lines.extend(translator.feed(chunk))
    calls, last = (json.loads(x) for x in lines)
    assert calls["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 1}}}]
    assert last["done"] is True
    generate = StreamTranslator("generate", "m", Timing())
    out = [json.loads(x) for c in _events({"choices": [{"text": "ab"}]}) for x in generate.feed(c)]
    assert out[0]["response"] == "ab" and out[-1]["done"] is True


def test_stream_error_event_is_an_ollama_error_line() -> None:
    translator = StreamTranslator("chat", "m", Timing())
    lines = translator.feed(b'data: {"error": {"message": "engine died"}}\n\n')
    assert [json.loads(x) for x in lines] == [{"error": "engine died"}]
    assert translator.finish() == []
