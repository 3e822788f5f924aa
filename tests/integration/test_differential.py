"""Issue 11: the appliance answers every route as ``vllm serve`` answers it.

vLLM's own OpenAI server runs the tiny chat model and MiniLM (one server each, as ``vllm
serve`` serves one model), the appliance runs both, with the same engine settings; each case
sends the same request to both and compares the answers after dropping what is random by
design (ids, timestamps): status, error type and message, texts, token ids, logprobs, finish
reasons, usage, stream events, embeddings and scores.

The appliance is the session's shared one (two HTTP workers, so the answers of both are
compared); vLLM's servers are the session's reference servers (``vllm_reference``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.harness import (
    ApplianceProcess,
)
from tests.integration.vllm_reference import CHAT_MODEL, EMBED_MODEL

pytestmark = pytest.mark.integration


@dataclass
class Servers:
    """vLLM's servers (one per model) and the appliance serving both."""

    vllm: dict[str, str]
    appliance: str


@pytest.fixture(scope="module")
def servers(serving_appliance: ApplianceProcess, vllm_reference: dict[str, str]) -> Servers:
    """The shared appliance (two HTTP workers) and vLLM's own servers of the same models."""
    return Servers(vllm=vllm_reference, appliance=serving_appliance.url)


# -- comparing answers ----------------------------------------------------------------------

_RANDOM_KEYS = frozenset({"created", "created_at"})
# Ids vLLM makes up per request: "chatcmpl-<hex>", "resp_<hex>", "msg_<hex>", ...
_RANDOM_ID = re.compile(
    r"^(chatcmpl(-tool)?|cmpl|resp|msg|rs|fc|call|embd|score|pooling|classify|tokn)[-_][0-9a-f]+$"
)


# vLLM's system_fingerprint hashes the whole engine config, which differs in what the
# appliance sets beside the model's settings (its KV-cache share, its logging): see README.
_FINGERPRINT = re.compile(r"^vllm-[0-9.]+-[0-9a-f]{8}$")


def normalise(value: Any) -> Any:
    """``value`` without timestamps, with per-request ids replaced by a placeholder."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if k not in _RANDOM_KEYS}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str) and _RANDOM_ID.match(value):
        return "<id>"
    if isinstance(value, str) and _FINGERPRINT.match(value):
        return "<fingerprint>"
    return value


FLOAT32_REL = 1e-6
"""How far two float32 results may be apart and still be the same answer: a few units in the
last place. Two processes running the same float32 model on CPU agree to rounding, not bit
for bit (oneDNN splits a batch's work by the threads it gets; a score of 0.35127443 came back
as 0.35127440 once in a hundred runs). Every other value must be equal."""


def same_values(got: Any, expected: Any) -> bool:
    """``got == expected``, except that floats may differ by float32 rounding."""
    if isinstance(got, float) and isinstance(expected, float):
        return math.isclose(got, expected, rel_tol=FLOAT32_REL, abs_tol=1e-9)
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_values(got[k], expected[k]) for k in got)
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return (
            type(got) is type(expected)
            and len(got) == len(expected)
            and all(same_values(g, e) for g, e in zip(got, expected, strict=True))
        )
    return bool(got == expected) and type(got) is type(expected)


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    """A server-sent-event stream as (event name, parsed data) pairs."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if not data and name is None:
            continue
        payload = "\n".join(data)
        try:
            parsed: Any = normalise(json.loads(payload))
        except ValueError:
            parsed = payload
        events.append((name, parsed))
    return events


@dataclass
class Answer:
    """One server's answer, ready to compare."""

    status: int
    body: Any


def ask(base: str, method: str, path: str, body: Any) -> Answer:
    """Send one request and read the whole answer (a stream as its events)."""
    response = httpx.request(
        method,
        f"{base}{path}",
        headers={"content-type": "application/json"},
        content=body if isinstance(body, bytes) else json.dumps(body) if body is not None else None,
        timeout=120,
    )
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return Answer(response.status_code, sse_events(response.text))
    try:
        return Answer(response.status_code, normalise(response.json()))
    except ValueError:
        return Answer(response.status_code, response.text)


def same_answer(servers: Servers, path: str, body: Any, model: str, method: str = "POST") -> Answer:
    """Send ``body`` to vLLM's server for ``model`` and to the appliance; assert the answers
    are the same; return the appliance's."""
    expected = ask(servers.vllm[model], method, path, body)
    got = ask(servers.appliance, method, path, body)
    for _ in range(STREAM_ROUNDS - 1):
        if not (_is_stream(got) and _is_stream(expected)):
            break
        if same_values(got.body, expected.body):
            break
        # How a stream is cut into events depends on when the API server reads the engine's
        # outputs (vLLM's RequestOutputCollector merges the ones not yet taken), so vLLM's own
        # server cuts the same answer differently from run to run on a busy machine: ask both
        # again; the events must still be equal, exactly, in one round.
        expected = ask(servers.vllm[model], method, path, body)
        got = ask(servers.appliance, method, path, body)
    assert got.status == expected.status, (path, body, expected.body, got.body)
    assert same_values(got.body, expected.body), (path, body, expected.body, got.body)
    assert got.status < 500, got.body
    return got


STREAM_ROUNDS = 3
"""How many times a stream pair is asked for before its events must have been equal once."""


def _is_stream(answer: Answer) -> bool:
    return (
        answer.status == 200
        and isinstance(answer.body, list)
        and bool(answer.body)
        and all(isinstance(event, tuple) for event in answer.body)
    )


# -- cases ----------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hello appliance"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


def completions(**extra: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "prompt": "the model serves", **GREEDY, **extra}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": MESSAGES, **GREEDY, **extra}


GENERATE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", completions()),
    ("/v1/completions", completions(n=2, seed=7, temperature=1.0)),
    ("/v1/completions", completions(logprobs=3, echo=True)),
    ("/v1/completions", completions(stop=["e"], ignore_eos=True, max_tokens=32)),
    ("/v1/completions", completions(presence_penalty=1.5, frequency_penalty=1.0)),
    ("/v1/completions", completions(logit_bias={"267": 100})),
    ("/v1/completions", completions(prompt=["one prompt", "another prompt"])),
    ("/v1/completions", completions(prompt=[1, 2, 3, 4], return_token_ids=True)),
    ("/v1/completions", completions(stream=True, stream_options={"include_usage": True})),
    ("/v1/completions", completions(stream=True, logprobs=2)),
    ("/v1/chat/completions", chat()),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=2, return_token_ids=True)),
    ("/v1/chat/completions", chat(n=2, seed=3, temperature=0.8)),
    ("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})),
    ("/v1/chat/completions", chat(stream=True)),
    (
        "/v1/responses",
        {"model": CHAT_MODEL, "input": "hello", "max_output_tokens": 8, "temperature": 0},
    ),
    (
        "/v1/responses",
        {
            "model": CHAT_MODEL,
            "input": MESSAGES,
            "max_output_tokens": 6,
            "temperature": 0,
            "stream": True,
        },
    ),
    ("/v1/responses/render", {"model": CHAT_MODEL, "input": "hello"}),
    (
        "/v1/messages",
        {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0},
    ),
    (
        "/v1/messages",
        {
            "model": CHAT_MODEL,
            "messages": MESSAGES,
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
        },
    ),
    ("/v1/messages/count_tokens", {"model": CHAT_MODEL, "messages": MESSAGES}),
    ("/v1/chat/completions/render", {"model": CHAT_MODEL, "messages": MESSAGES}),
    ("/v1/completions/render", {"model": CHAT_MODEL, "prompt": "hello"}),
    ("/tokenize", {"model": CHAT_MODEL, "prompt": "hello world"}),
    ("/tokenize", {"model": CHAT_MODEL, "messages": MESSAGES, "add_generation_prompt": True}),
    ("/detokenize", {"model": CHAT_MODEL, "tokens": [267, 404, 375]}),
]

WEATHER_SCHEMA = {
    "type": "object",
    # Enums keep a random-weight model's output short: an open string or integer may run on
    # until max_tokens, valid so far but never closed.
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
    }
]
NAMED_TOOL = {"type": "function", "function": {"name": "get_weather"}}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA},
}
STRUCTURED = {"max_tokens": 48, "temperature": 0}

GENERATE_CASES += [
    ("/v1/chat/completions", chat(tools=TOOLS, tool_choice=NAMED_TOOL, **STRUCTURED)),
    ("/v1/chat/completions", chat(tools=TOOLS, tool_choice="auto")),
    ("/v1/chat/completions", chat(tools=TOOLS, tool_choice="required", **STRUCTURED)),
    ("/v1/chat/completions", chat(response_format=JSON_SCHEMA_FORMAT, **STRUCTURED)),
    ("/v1/chat/completions", chat(tools=TOOLS, tool_choice=NAMED_TOOL, stream=True, **STRUCTURED)),
    ("/v1/completions", completions(structured_outputs={"json": WEATHER_SCHEMA}, **STRUCTURED)),
]

EMBED_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": ["A man is eating food.", "Stocks fell."]}),
    (
        "/v1/embeddings",
        {"model": EMBED_MODEL, "input": [[101, 2023, 102]], "encoding_format": "base64"},
    ),
    ("/pooling", {"model": EMBED_MODEL, "input": "A man is eating food."}),
    (
        "/score",
        {
            "model": EMBED_MODEL,
            "text_1": "a man eats",
            "text_2": ["a man eats food", "stocks fell"],
        },
    ),
    ("/v1/score", {"model": EMBED_MODEL, "text_1": "a man eats", "text_2": "stocks fell"}),
    (
        "/rerank",
        {"model": EMBED_MODEL, "query": "a man eats", "documents": ["food", "stocks fell"]},
    ),
    (
        "/v1/rerank",
        {"model": EMBED_MODEL, "query": "a man eats", "documents": ["food", "stocks"], "top_n": 1},
    ),
    ("/v2/rerank", {"model": EMBED_MODEL, "query": "a man eats", "documents": ["food", "stocks"]}),
    (
        "/v2/embed",
        {"model": EMBED_MODEL, "texts": ["A man is eating food."], "embedding_types": ["float"]},
    ),
    ("/tokenize", {"model": EMBED_MODEL, "prompt": "A man is eating food."}),
]

# Bad input on every route: vLLM's own 4xx, the same status and body from both.
BAD_CASES: list[tuple[str, str, dict[str, Any]]] = [
    (CHAT_MODEL, "/v1/completions", completions(max_tokens=100000)),
    (CHAT_MODEL, "/v1/completions", completions(logprobs=99)),
    (CHAT_MODEL, "/v1/completions", completions(prompt="word " * 2000)),
    (CHAT_MODEL, "/v1/chat/completions", chat(temperature=-1)),
    (CHAT_MODEL, "/v1/chat/completions", chat(n=0)),
    (CHAT_MODEL, "/v1/responses", {"model": CHAT_MODEL}),
    (CHAT_MODEL, "/v1/responses", {"model": CHAT_MODEL, "input": "hi", "max_output_tokens": "x"}),
    (CHAT_MODEL, "/v1/responses", {"model": CHAT_MODEL, "input": "word " * 2000}),
    (CHAT_MODEL, "/v1/messages", {"model": CHAT_MODEL, "messages": MESSAGES}),
    (CHAT_MODEL, "/v1/messages", {"model": CHAT_MODEL, "messages": "hi", "max_tokens": 4}),
    (CHAT_MODEL, "/v1/messages/count_tokens", {"model": CHAT_MODEL}),
    (CHAT_MODEL, "/tokenize", {"model": CHAT_MODEL}),
    (CHAT_MODEL, "/tokenize", {"model": CHAT_MODEL, "prompt": 5}),
    (CHAT_MODEL, "/detokenize", {"model": CHAT_MODEL, "tokens": ["x"]}),
    (CHAT_MODEL, "/detokenize", {"model": CHAT_MODEL, "tokens": [-1]}),
    (CHAT_MODEL, "/v1/chat/completions/render", {"model": CHAT_MODEL, "messages": 3}),
    (EMBED_MODEL, "/v1/embeddings", {"model": EMBED_MODEL, "input": "long " * 1000}),
    (EMBED_MODEL, "/pooling", {"model": EMBED_MODEL}),
    (EMBED_MODEL, "/score", {"model": EMBED_MODEL, "text_1": "a"}),
    (EMBED_MODEL, "/rerank", {"model": EMBED_MODEL, "documents": ["a"]}),
    (EMBED_MODEL, "/v2/rerank", {"model": EMBED_MODEL, "query": 3, "documents": ["a"]}),
    (EMBED_MODEL, "/v2/embed", {"model": EMBED_MODEL, "texts": ["a"], "input_type": "nope"}),
]


@pytest.mark.parametrize(
    ("path", "body"), GENERATE_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_generate_model_answers_as_vllm_does(
    servers: Servers, path: str, body: dict[str, Any]
) -> None:
    same_answer(servers, path, body, CHAT_MODEL)


@pytest.mark.parametrize(
    ("path", "body"), EMBED_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_embedding_model_answers_as_vllm_does(
    servers: Servers, path: str, body: dict[str, Any]
) -> None:
    same_answer(servers, path, body, EMBED_MODEL)


@pytest.mark.parametrize(
    ("model", "path", "body"), BAD_CASES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_bad_input_gets_vllms_own_4xx(
    servers: Servers, model: str, path: str, body: dict[str, Any]
) -> None:
    got = same_answer(servers, path, body, model)
    assert 400 <= got.status < 500
    ok = httpx.post(f"{servers.appliance}/tokenize", json={"model": model, "prompt": "hi"})
    assert ok.status_code == 200  # still serving


def test_version_is_vllms(servers: Servers) -> None:
    expected = ask(servers.vllm[CHAT_MODEL], "GET", "/version", None)
    assert ask(servers.appliance, "GET", "/version", None) == expected


def test_tokenizer_info_is_vllms(servers: Servers) -> None:
    """Issue 28: GET /tokenizer_info of the model whose engine: turns it on, named or not."""
    expected = ask(servers.vllm[CHAT_MODEL], "GET", "/tokenizer_info", None)
    assert expected.status == 200 and "chat_template" in expected.body, expected.body
    theirs = dict(expected.body)
    their_folder = theirs.pop("name_or_path", None)
    for query in ("", f"?model={CHAT_MODEL}"):  # the one model that serves it, or named
        got = ask(servers.appliance, "GET", "/tokenizer_info" + query, None)
        assert got.status == 200, got.body
        ours = dict(got.body)
        folder = ours.pop("name_or_path", None)
        # The same folder, or the model's name for a caller who is not an admin.
        assert folder == CHAT_MODEL or os.path.realpath(folder) == os.path.realpath(their_folder)
        assert ours == theirs
    # MiniLM's vLLM app has the route too (vLLM adds it to a module-level router, and both
    # apps live in one process), but its entry does not turn it on: refused, others served.
    refused = ask(servers.appliance, "GET", f"/tokenizer_info?model={EMBED_MODEL}", None)
    assert refused.status == 400
    assert "enable_tokenizer_info_endpoint" in refused.body["error"]["message"]
    assert ask(servers.appliance, "GET", "/tokenizer_info", None).status == 200


def test_stored_response_lookup_answers_as_vllm_does(servers: Servers) -> None:
    for path, method in (
        ("/v1/responses/resp_0000", "GET"),
        ("/v1/responses/resp_0000/cancel", "POST"),
    ):
        same_answer(servers, path, None, CHAT_MODEL, method=method)


def test_a_route_the_model_does_not_serve_names_the_routes_it_serves(servers: Servers) -> None:
    # vLLM's one-model server has no such route at all (404); the appliance serves other
    # models on it, so it says which routes this model serves.
    answer = ask(servers.appliance, "POST", "/v1/responses", {"model": EMBED_MODEL, "input": "hi"})
    assert answer.status == 400
    message = answer.body["error"]["message"]
    assert "minilm" in message and "/v1/embeddings" in message and "/rerank" in message
    answer = ask(
        servers.appliance,
        "POST",
        "/rerank",
        {"model": CHAT_MODEL, "query": "a", "documents": ["b"]},
    )
    assert answer.status == 400
    assert "/v1/responses" in answer.body["error"]["message"]


def test_models_list_carries_vllms_fields(servers: Servers) -> None:
    ours = {m["id"]: m for m in httpx.get(f"{servers.appliance}/v1/models").json()["data"]}
    for model, url in servers.vllm.items():
        (theirs,) = httpx.get(f"{url}/v1/models").json()["data"]
        for field in ("parent", "max_model_len"):
            assert ours[model][field] == theirs[field], (model, field)
        # The same folder (the appliance names it with symlinks resolved).
        assert os.path.realpath(ours[model]["root"]) == os.path.realpath(theirs["root"])
        assert ours[model]["state"] == "ready"  # plus the appliance's own fields


def _valid_weather(text: str) -> None:
    """``text`` is JSON that WEATHER_SCHEMA accepts."""
    value = json.loads(text)
    assert set(value) == {"city", "days"}, value
    assert value["city"] in ("Paris", "Oslo", "Lima")
    assert value["days"] in (1, 2, 3) and not isinstance(value["days"], bool)


def test_named_tool_choice_gives_schema_valid_arguments(servers: Servers) -> None:
    answer = same_answer(
        servers,
        "/v1/chat/completions",
        chat(tools=TOOLS, tool_choice=NAMED_TOOL, **STRUCTURED),
        CHAT_MODEL,
    )
    assert answer.status == 200, answer.body
    (call,) = answer.body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    _valid_weather(call["function"]["arguments"])


def test_json_schema_response_format_gives_schema_valid_json(servers: Servers) -> None:
    answer = same_answer(
        servers,
        "/v1/chat/completions",
        chat(response_format=JSON_SCHEMA_FORMAT, **STRUCTURED),
        CHAT_MODEL,
    )
    assert answer.status == 200, answer.body
    _valid_weather(answer.body["choices"][0]["message"]["content"])
