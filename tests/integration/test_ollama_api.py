"""Issue 28: Ollama's own Python client, unchanged, against the shared appliance (two HTTP
workers): chat, stream, generate, embed, list, show, keep_alive, and bad input answered with
Ollama's error shape (a 4xx, never a 500)."""

from __future__ import annotations

import datetime as dt

import httpx
import ollama
import pytest

from tests.integration.harness import ApplianceProcess

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hello appliance"}]
FEW = {"num_predict": 6, "temperature": 0}


@pytest.fixture(scope="module")
def olla(serving_appliance: ApplianceProcess) -> ollama.Client:
    """Ollama's client pointed at the appliance's port, as a user would point it."""
    return ollama.Client(host=serving_appliance.url, timeout=120)


def test_chat(olla: ollama.Client) -> None:
    reply = olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW)
    assert reply.model == "tiny-chat"
    assert reply.message.role == "assistant"
    assert reply.message.content
    assert reply.done is True and reply.done_reason == "length"
    assert reply.eval_count == 6
    assert reply.prompt_eval_count and reply.prompt_eval_count > 0
    assert reply.total_duration and reply.total_duration > 0


def test_chat_stream(olla: ollama.Client) -> None:
    parts = list(olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW, stream=True))
    assert len(parts) >= 2
    assert all(p.done is False for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts)
    last = parts[-1]
    assert last.done is True and last.done_reason == "length" and last.eval_count == 6


def test_chat_same_text_as_openai_route(
    olla: ollama.Client, serving_appliance: ApplianceProcess
) -> None:
    """The same request path: greedy text equals /v1's for the same messages."""
    ours = olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW).message.content
    openai = httpx.post(
        f"{serving_appliance.url}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 6, "temperature": 0},
        timeout=60,
    ).json()
    assert ours == openai["choices"][0]["message"]["content"]


def test_generate_and_raw(olla: ollama.Client) -> None:
    templated = olla.generate(model="tiny-chat", prompt="hello", options=FEW)
    assert templated.response and templated.done and templated.eval_count == 6
    raw = olla.generate(model="tiny-chat:latest", prompt="hello", raw=True, options=FEW)
    assert raw.response and raw.done_reason == "length"
    streamed = list(
        olla.generate(model="tiny-chat", prompt="hello", raw=True, options=FEW, stream=True)
    )
    assert "".join(p.response or "" for p in streamed) == raw.response
    assert streamed[-1].done and streamed[-1].eval_count == 6


def test_format_json_schema(olla: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reply = olla.chat(
        model="tiny-chat",
        messages=MESSAGES,
        format=schema,
        options={"num_predict": 40, "temperature": 0},
    )
    assert reply.message.content.lstrip().startswith("{")


def test_embed(olla: ollama.Client) -> None:
    many = olla.embed(model="minilm", input=["one", "two"])
    assert len(many.embeddings) == 2 and len(many.embeddings[0]) == 384
    one = olla.embeddings(model="minilm", prompt="one")
    assert one.embedding == pytest.approx(many.embeddings[0], abs=1e-4)


def test_list_ps_show(olla: ollama.Client) -> None:
    names = {m.model for m in olla.list().models}
    assert {"tiny-chat", "minilm"} <= names
    running = {m.model: m for m in olla.ps().models}
    assert {"tiny-chat", "minilm"} <= set(running)
    assert running["tiny-chat"].context_length == 512
    shown = olla.show("tiny-chat")
    assert shown.capabilities == ["completion"]
    assert olla.show("minilm").capabilities == ["embedding"]


def test_keep_alive_is_honoured(olla: ollama.Client, serving_appliance: ApplianceProcess) -> None:
    """A request's keep_alive sets when its model unloads once idle; -1 keeps it loaded (as
    the shared appliance's models are: later modules rely on it)."""
    try:
        olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW, keep_alive="7m")
        expires = {m.model: m.expires_at for m in olla.ps().models}["tiny-chat"]
        assert expires is not None
        left = expires - dt.datetime.now(dt.timezone.utc)
        assert dt.timedelta(minutes=6) < left <= dt.timedelta(minutes=7, seconds=5)
    finally:
        olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW, keep_alive=-1)
    expires = {m.model: m.expires_at for m in olla.ps().models}["tiny-chat"]
    assert expires is not None and expires.year == 9999
    # The OpenAI route accepts the field too (and leaves it to the model's own keep_alive).
    plain = httpx.post(
        f"{serving_appliance.url}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2, "keep_alive": "5m"},
        timeout=60,
    )
    assert plain.status_code == 200, plain.text
    expires = {m.model: m.expires_at for m in olla.ps().models}["tiny-chat"]
    assert expires is not None and expires.year == 9999


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"model": 5, "messages": []}', 400),
        (b'{"model": "tiny-chat", "messages": "hi"}', 400),
        (b'{"model": "tiny-chat", "messages": [{"content": "no role"}]}', 400),
        (b'{"model": "tiny-chat", "messages": [], "keep_alive": "soon"}', 400),
        (b'{"model": "tiny-chat", "messages": [{"role": "user"}], "format": "yaml"}', 400),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404),
        (b'{"model": "minilm", "messages": [{"role": "user", "content": "x"}]}', 400),
    ],
)
def test_bad_chat_is_an_ollama_4xx(
    serving_appliance: ApplianceProcess, body: bytes, status: int
) -> None:
    got = httpx.post(
        f"{serving_appliance.url}/api/chat",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert got.status_code == status, got.text
    assert isinstance(got.json()["error"], str) and got.json()["error"]


def test_client_sees_ollama_errors(olla: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        olla.chat(model="no-such-model", messages=MESSAGES)
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        olla.show("no-such-model")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        olla.copy("tiny-chat", "other")
    assert caught.value.status_code == 501 and "alias" in caught.value.error
    # Others are still served after the refusals.
    assert olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW).done


def test_pull_and_delete_map_to_the_appliances_pull_and_rm(olla: ollama.Client) -> None:
    """The shared appliance serves local folders: nothing to pull, never deleted (the hub
    pull itself, through this client, is in test_hub_pull.py)."""
    with pytest.raises(ollama.ResponseError) as caught:
        olla.pull("tiny-chat")
    assert caught.value.status_code == 400 and "nothing to pull" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        olla.delete("tiny-chat")
    assert caught.value.status_code == 400 and "never deleted" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        olla.delete("no-such-model")
    assert caught.value.status_code == 404
    # Others are still served, and the model's files are where they were.
    assert olla.chat(model="tiny-chat", messages=MESSAGES, options=FEW).done
