"""Issue 25 part A through the real app factory on a test engine: the fan-out charged to a
key's rate, and stored responses owned by their key (real vLLM: test_hardening.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import ApiKey
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.host.inventory import Inventory, cpu_inventory
from appliance.host.placement import Allocation
from tests.fakes import EchoEngine
from tests.unit.fast_app import fast_settings

A = {"Authorization": "Bearer sk-alice-0123456789"}
B = {"Authorization": "Bearer sk-bob-0123456789"}
ROUTES = frozenset(
    {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/responses",
        "GET /v1/responses/{response_id}",
        "POST /v1/responses/{response_id}/cancel",
    }
)


class StoringEngine(EchoEngine):
    """Keeps each response under the body's ``request_id``, as vLLM's store does."""

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, str] = {}

    def routes(self) -> frozenset[str]:  # type: ignore[override]
        return ROUTES

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        if call.endpoint is not None:
            return JSONReply(200, json.dumps({"choices": [{}] * int(body.get("n", 1))}).encode())
        if call.method == "POST" and call.path == "/v1/responses":
            rid = body.get("request_id", "resp_vllm")
            self.store[rid] = body["input"]
            return JSONReply(200, json.dumps({"id": rid, "output": body["input"]}).encode())
        rid = call.path.split("/")[3]
        if rid not in self.store:
            return JSONReply(404, json.dumps({"error": {"message": "not found"}}).encode())
        return JSONReply(200, json.dumps({"id": rid, "output": self.store[rid]}).encode())

    def forget_responses(self, ids: list[str]) -> int:
        return sum(self.store.pop(i, None) is not None for i in ids)


class StoringMaker:
    def __init__(self) -> None:
        self.made: list[StoringEngine] = []

    def validate(self, spec: Any) -> None:
        pass

    def create(self, spec: Any, allocation: Allocation, inventory: Inventory) -> StoringEngine:
        self.made.append(StoringEngine())
        return self.made[-1]

    def adapter_source(self, model: str, name: str, source: str) -> str:
        return source


@pytest.fixture
def app_and_maker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, StoringMaker]]:
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    entry = {"name": "chat", "source": "org/chat", "resources": {"memory_gib": 1}}
    keys = [
        ApiKey.model_validate(
            {"name": "alice", "key": "sk-alice-0123456789", "requests_per_minute": 10}
        ),
        ApiKey.model_validate({"name": "bob", "key": "sk-bob-0123456789"}),
    ]
    settings = fast_settings(tmp_path, [entry], keys, stored_responses={"max_per_key": 2})
    maker = StoringMaker()
    app = create_app(settings, engines=maker, inventory=cpu_inventory(4))
    with TestClient(app) as client:
        client.portal.call(app.state.appliance.supervisor.wait_autoload)  # type: ignore[union-attr]
        yield client, maker


def test_each_sequence_takes_a_slot_of_the_keys_rate(
    app_and_maker: tuple[TestClient, StoringMaker],
) -> None:
    client, _ = app_and_maker
    body = {"model": "chat", "prompt": "x", "max_tokens": 1}
    statuses = [
        client.post("/v1/completions", json={**body, "n": n}, headers=A).status_code
        for n in (11, 8, 2, 1)
    ]
    # 11 > 10 a minute: 400; 8 fit (9 used with the first's slot); 2 do not (the key check
    # counted its first, as for any refused request: 10 used); so 1 more does not either.
    assert statuses == [400, 200, 429, 429]
    assert client.post("/v1/completions", json={**body, "n": 16}, headers=B).status_code == 200
    too_many = client.post("/v1/completions", json={**body, "n": 17}, headers=B)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_a_stored_response_is_its_keys_alone(
    app_and_maker: tuple[TestClient, StoringMaker],
) -> None:
    client, maker = app_and_maker
    made = client.post(
        "/v1/responses",
        json={"model": "chat", "input": "mine", "request_id": "resp_chosen"},
        headers=A,
    ).json()
    rid = made["id"]
    assert rid != "resp_chosen" and rid.startswith("resp_")
    assert client.get(f"/v1/responses/{rid}", headers=A).json()["output"] == "mine"
    for method, path in (("GET", f"/v1/responses/{rid}"), ("POST", f"/v1/responses/{rid}/cancel")):
        theirs = client.request(method, path, headers=B)
        assert theirs.status_code == 404
        assert theirs.json()["error"]["message"] == f"Response with id '{rid}' not found."
    follow = {"model": "chat", "input": "more", "previous_response_id": rid}
    stolen = client.post("/v1/responses", json=follow, headers=B)
    assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "previous_response_id"
    planted = {"model": "chat", "input": "planted", "request_id": rid}
    assert client.post("/v1/responses", json=planted, headers=B).json()["id"] != rid
    assert client.get(f"/v1/responses/{rid}", headers=A).json()["output"] == "mine"
    assert client.post("/v1/responses", json=follow, headers=A).status_code == 200
    # Past two per key, alice's oldest leaves the engine's store too.
    client.post("/v1/responses", json={"model": "chat", "input": "third"}, headers=A)
    assert client.get(f"/v1/responses/{rid}", headers=A).status_code == 404
    assert rid not in maker.made[0].store


def test_a_stored_response_read_is_lent_its_model_as_any_model_request(
    app_and_maker: tuple[TestClient, StoringMaker],
) -> None:
    client, _ = app_and_maker
    registry = client.app.state.appliance.metrics.registry  # type: ignore[attr-defined]

    def admitted() -> float:
        labels = {"key": "alice", "model": "chat"}
        return registry.get_sample_value("appliance_key_admitted_total", labels) or 0.0

    rid = client.post("/v1/responses", json={"model": "chat", "input": "mine"}, headers=A)
    before = admitted()
    got = client.get(f"/v1/responses/{rid.json()['id']}", headers=A)
    assert got.status_code == 200 and got.json()["output"] == "mine"
    # Through the same lease as every model request (its key's place in the model's queue).
    assert admitted() == before + 1
