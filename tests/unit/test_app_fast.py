"""The whole HTTP app (the real factory, middleware, auth, routes, supervisor) on a test engine:
routes, aliases, adapters, streaming release and admin routes in seconds. Real vLLM is the
integration tests' business."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import ApiKey, AuthConfig, Role
from appliance.host.inventory import cpu_inventory
from appliance.settings import Settings
from tests.fakes import EchoEngine, FakeMaker

ADMIN = {"Authorization": "Bearer sk-ops-0123456789"}


class EchoMaker(FakeMaker):
    """Makes ``EchoEngine``s, which start at once."""

    def __init__(self) -> None:
        super().__init__(0.0, EchoEngine)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = tmp_path / "models.yaml"
    entry = {
        "name": "chat",
        "source": "org/chat",
        "aliases": ["gpt-4o-mini"],
        "adapters": [{"name": "chat-sql", "source": "org/sql"}],
        "resources": {"memory_gib": 1},
    }
    config.write_text(yaml.safe_dump({"models": [entry]}))
    admin = ApiKey.model_validate({"name": "ops", "key": "sk-ops-0123456789", "role": Role.ADMIN})
    settings = Settings(
        config_path=config,
        cpu_memory_budget_gib=4,
        allowed_hosts=["*"],
        auth=AuthConfig(keys=[admin]),
        status_page=False,
        list_aliases=True,
        usage_db=tmp_path / "usage.db",
    )
    app = create_app(settings, engines=EchoMaker(), inventory=cpu_inventory(4))
    with TestClient(app) as test_client:
        supervisor = app.state.appliance.supervisor
        test_client.portal.call(supervisor.wait_autoload)  # type: ignore[union-attr]
        yield test_client


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def in_flight(client: TestClient) -> int:
    return int(client.get("/admin/models/chat/status", headers=ADMIN).json()["in_flight"])


def test_names_aliases_and_adapters_reach_the_engine_as_vllm_would_see_them(
    client: TestClient,
) -> None:
    for asked, answered in (("chat", "chat"), ("gpt-4o-mini", "chat"), ("chat-sql", "chat-sql")):
        reply = client.post("/v1/chat/completions", json=chat(asked), headers=ADMIN)
        assert reply.status_code == 200 and reply.json()["model"] == answered, asked
    missing = client.post("/v1/chat/completions", json=chat("nope"), headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    listed = {m["id"]: m for m in client.get("/v1/models", headers=ADMIN).json()["data"]}
    assert listed["gpt-4o-mini"]["alias_of"] == "chat"
    assert listed["chat-sql"]["parent"] == "chat"


def test_a_stream_holds_the_model_until_its_last_event(client: TestClient) -> None:
    with client.stream(
        "POST", "/v1/chat/completions", json=chat("gpt-4o-mini", stream=True), headers=ADMIN
    ) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"model": "chat"' in events[0]
    assert in_flight(client) == 0


def test_adapters_load_and_unload_through_the_admin_routes(client: TestClient) -> None:
    base = "/admin/models/gpt-4o-mini/adapters"  # an alias names its model here too
    loaded = client.post(
        f"{base}/load", json={"name": "chat-fr", "source": "org/fr"}, headers=ADMIN
    )
    assert loaded.status_code == 200, loaded.text
    names = [a["name"] for a in client.get(base, headers=ADMIN).json()["data"]]
    assert names == ["chat-sql", "chat-fr"]
    reply = client.post("/v1/completions", json={"model": "chat-fr", "prompt": "x"}, headers=ADMIN)
    assert reply.json()["model"] == "chat-fr"
    bad = client.post(f"{base}/load", json={"name": "chat-fr2"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "source"
    taken = client.post(f"{base}/load", json={"name": "chat", "source": "x"}, headers=ADMIN)
    assert taken.status_code == 409
    gone = client.post(f"{base}/unload", json={"name": "chat-fr"}, headers=ADMIN)
    assert gone.status_code == 200
    after = client.post("/v1/completions", json={"model": "chat-fr", "prompt": "x"}, headers=ADMIN)
    assert after.status_code == 404
    # An adapter is not a model to operate on: the admin routes do not resolve it.
    assert client.post("/admin/models/chat-sql/unload", headers=ADMIN).status_code == 404


def test_the_admin_api_needs_the_admin_key_off_loopback(client: TestClient) -> None:
    assert client.get("/admin/models").status_code in (401, 403)
    assert client.get("/admin/models", headers=ADMIN).status_code == 200
