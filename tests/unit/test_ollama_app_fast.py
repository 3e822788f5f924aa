"""Issue 28: Ollama's routes in the whole HTTP app (real factory, auth, supervisor) on a test
engine that answers as vLLM's OpenAI layer does: shapes, keep_alive rules, roles, errors."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import ApiKey
from appliance.engines.base import Endpoint, JSONReply, Reply, RouteCall, StreamReply
from appliance.host.inventory import cpu_inventory
from tests.fakes import EchoEngine
from tests.unit.fast_app import fast_settings
from tests.unit.test_app_fast import EchoMaker

ADMIN = {"Authorization": "Bearer sk-ops-0123456789"}
LOADER = {"Authorization": "Bearer sk-loader-0123456789"}
NO_LOAD = {"Authorization": "Bearer sk-noload-0123456789"}
MESSAGES = [{"role": "user", "content": "hi"}]


class OpenAIShaped(EchoEngine):
    """Answers chat and completions as vLLM's OpenAI layer shapes them; keeps each body."""

    bodies: list[dict[str, Any]]

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        endpoint = call.endpoint
        self.bodies = [*getattr(self, "bodies", []), body]
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        if body.get("temperature") == "hot":
            error = {"error": {"message": "temperature: not a number", "code": 400}}
            return JSONReply(400, json.dumps(error).encode())
        if not body.get("stream"):
            choice = (
                {"message": {"role": "assistant", "content": "ok"}}
                if endpoint is Endpoint.CHAT
                else {"text": "ok"}
            )
            reply = {"choices": [{**choice, "finish_reason": "length"}], "usage": usage}
            return JSONReply(200, json.dumps(reply).encode())

        async def events() -> AsyncIterator[bytes]:
            for text in ("o", "k"):
                yield f'data: {{"choices":[{{"delta":{{"content":"{text}"}}}}]}}\n\n'.encode()
            yield b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
            yield f'data: {{"choices":[],"usage":{json.dumps(usage)}}}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return StreamReply(events())


class Maker(EchoMaker):
    def create(self, spec: Any, allocation: Any, inventory: Any) -> OpenAIShaped:
        self.made.append(OpenAIShaped())
        return self.made[-1]  # type: ignore[return-value]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    entry = {"name": "chat", "source": "org/chat", "resources": {"memory_gib": 1}}
    pinned = {"name": "pinned", "source": "org/pinned", "resources": {"memory_gib": 1}}
    keys = [
        ApiKey.model_validate({"name": "ops", "key": ADMIN["Authorization"][7:], "role": "admin"}),
        ApiKey.model_validate({"name": "loader", "key": LOADER["Authorization"][7:]}),
        ApiKey.model_validate(
            {"name": "noload", "key": NO_LOAD["Authorization"][7:], "may_load": False}
        ),
    ]
    settings = fast_settings(tmp_path, [{**entry, "load_on_demand": True}, pinned], keys)
    app = create_app(settings, engines=Maker(), inventory=cpu_inventory(4))
    with TestClient(app) as test_client:
        supervisor = app.state.appliance.supervisor
        test_client.portal.call(supervisor.wait_autoload)  # type: ignore[union-attr]
        test_client.app_state = app.state  # type: ignore[attr-defined]
        yield test_client


def _handle(client: TestClient, name: str = "chat") -> Any:
    return client.app_state.appliance.supervisor.get(name)  # type: ignore[attr-defined]


def test_chat_whole_and_streamed(client: TestClient) -> None:
    whole = client.post(
        "/api/chat",
        json={"model": "chat:latest", "messages": MESSAGES, "stream": False},
        headers=LOADER,
    )
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    assert answer["model"] == "chat:latest" and answer["message"]["content"] == "ok"
    assert answer["done_reason"] == "length" and answer["eval_count"] == 2
    with client.stream(
        "POST", "/api/chat", json={"model": "chat", "messages": MESSAGES}, headers=LOADER
    ) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert [x.get("message", {}).get("content") for x in lines] == ["o", "k", ""]
    assert lines[-1]["done"] is True and lines[-1]["prompt_eval_count"] == 3
    engine = _handle(client).engine
    assert engine.bodies[-1]["stream_options"] == {"include_usage": True}


def test_empty_messages_load_the_model(client: TestClient) -> None:
    got = client.post("/api/generate", json={"model": "chat"}, headers=LOADER).json()
    assert got["done"] is True and got["done_reason"] == "load" and got["response"] == ""


def test_keep_alive_is_honoured_only_for_keys_that_may_load(client: TestClient) -> None:
    handle = _handle(client)
    assert handle.keep_alive() is None  # the entry's own: stays loaded
    body = {"model": "chat", "messages": MESSAGES, "stream": False}
    client.post("/api/chat", json={**body, "keep_alive": "0"}, headers=NO_LOAD)
    assert handle.keep_alive() is None  # ignored: it may not load the model back
    client.post("/api/chat", json={**body, "keep_alive": "5m"}, headers=LOADER)
    assert handle.keep_alive() == 300.0
    client.post("/api/chat", json={**body, "keep_alive": -1}, headers=ADMIN)
    assert handle.keep_alive() is None and handle.keep_alive_asked[1] == math.inf
    # A model that does not load on demand takes keep_alive from admins only.
    pinned = {**body, "model": "pinned"}
    client.post("/api/chat", json={**pinned, "keep_alive": 0}, headers=LOADER)
    assert _handle(client, "pinned").keep_alive() is None
    client.post("/api/chat", json={**pinned, "keep_alive": 60}, headers=ADMIN)
    assert _handle(client, "pinned").keep_alive() == 60.0
    # Asked of one engine only: the next engine goes by the entry's keep_alive again.
    handle.keep_alive_asked = (object(), 1.0)
    assert handle.keep_alive() is None


def test_lists_show_version(client: TestClient) -> None:
    tags = client.get("/api/tags", headers=LOADER).json()["models"]
    assert [m["name"] for m in tags] == ["chat", "pinned"]
    ps = client.get("/api/ps", headers=LOADER).json()["models"]
    assert ps[0]["name"] == "chat" and ps[0]["expires_at"].startswith("9999")
    shown = client.post("/api/show", json={"model": "chat:latest"}, headers=LOADER).json()
    assert "model_info" in shown and shown["capabilities"] == ["completion"]
    assert client.get("/api/version", headers=LOADER).json()["version"]


def test_errors_are_ollama_shaped(client: TestClient) -> None:
    cases = [
        ("/api/chat", {"model": "nope", "messages": MESSAGES}, 404),
        ("/api/chat", {"model": "chat", "messages": 3}, 400),
        (
            "/api/chat",
            {
                "model": "chat",
                "messages": MESSAGES,
                "options": {"temperature": "hot"},
                "stream": False,
            },
            400,
        ),
        ("/api/show", {"model": "nope"}, 404),
        ("/api/embed", {"model": 1, "input": "x"}, 400),
        ("/api/create", {"model": "x"}, 501),
        ("/api/push", {"model": "x"}, 501),
    ]
    for path, body, status in cases:
        got = client.post(path, json=body, headers=LOADER)
        assert got.status_code == status, (path, got.text)
        assert isinstance(got.json()["error"], str), got.text
    assert client.post("/api/chat", content=b"{", headers=LOADER).json()["error"]
    # No key: refused in Ollama's shape too.
    refused = client.post("/api/chat", json={"model": "chat", "messages": MESSAGES})
    assert refused.status_code == 401 and isinstance(refused.json()["error"], str)


def test_pull_and_delete_are_for_admins(client: TestClient) -> None:
    assert client.post("/api/pull", json={"model": "chat"}, headers=LOADER).status_code == 403
    assert (
        client.request("DELETE", "/api/delete", json={"model": "chat"}, headers=LOADER).status_code
        == 403
    )
    # An admin's pull is the hub pull (tests/unit/test_ollama_pull.py); offline here, it is
    # refused before anything streams, in Ollama's shape.
    admin = client.post("/api/pull", json={"model": "chat"}, headers=ADMIN)
    assert admin.status_code == 400 and "org/chat" in admin.json()["error"]


def test_a_grammar_bomb_in_format_is_refused_before_the_engine(client: TestClient) -> None:
    # Issue 25's bomb, sent as Ollama's `format`: the same structured-output limit applies.
    bomb = {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "string", "pattern": "(a{1,64}){1,64}"} for i in range(32)
        },
    }
    got = client.post(
        "/api/chat",
        json={"model": "chat", "messages": MESSAGES, "format": bomb, "stream": False},
        headers=LOADER,
    )
    assert got.status_code == 400, got.text
    assert "repeat" in got.json()["error"]
    ok = client.post(
        "/api/chat", json={"model": "chat", "messages": MESSAGES, "stream": False}, headers=LOADER
    )
    assert ok.status_code == 200, ok.text
