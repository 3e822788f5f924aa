"""Issue 28: ``GET /tokenizer_info`` in the whole HTTP app (real factory, auth, supervisor) on a
test engine that answers the route as vLLM's app does: which model, which keys, paths hidden.
Real vLLM answers it in tests/integration/test_serving.py."""

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
from appliance.engines.route_table import TOKENIZER_INFO, route_enabled
from appliance.host.inventory import cpu_inventory
from tests.unit.fast_app import fast_settings
from tests.unit.test_app_fast import EchoEngine, EchoMaker

ADMIN = {"Authorization": "Bearer sk-ops-0123456789"}
USER = {"Authorization": "Bearer sk-user-0123456789"}  # may use "info" and "plain" only
SOLO = {"Authorization": "Bearer sk-solo-0123456789"}  # may use "plain" only
FOLDER = "/srv/models/info"


class TokenizerEngine(EchoEngine):
    """Serves vLLM's routes, /tokenizer_info among them (as every vLLM app built after one
    with the flag does: vLLM's router is module-level); keeps the calls."""

    calls: list[RouteCall]

    def routes(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"POST /tokenize", "POST /detokenize", TOKENIZER_INFO.key})

    async def serve(self, call: RouteCall, request: Any) -> Reply:
        self.calls = [*getattr(self, "calls", []), call]
        body = {"tokenizer_class": "PreTrainedTokenizerFast", "name_or_path": FOLDER}
        return JSONReply(200, json.dumps(body).encode())


class Maker(EchoMaker):
    def create(self, spec: Any, allocation: Any, inventory: Any) -> TokenizerEngine:
        self.made.append(TokenizerEngine())
        return self.made[-1]  # type: ignore[return-value]


def app_with(tmp_path: Path, *enabled: str) -> Any:
    """Models info, other and plain; those in ``enabled`` set the engine setting."""
    models = [
        {
            "name": name,
            "source": f"org/{name}",
            "resources": {"memory_gib": 1},
            "engine": {"enable_tokenizer_info_endpoint": True} if name in enabled else {},
        }
        for name in ("info", "other", "plain")
    ]
    keys = [
        ApiKey.model_validate({"name": "ops", "key": ADMIN["Authorization"][7:], "role": "admin"}),
        ApiKey.model_validate(
            {"name": "user", "key": USER["Authorization"][7:], "models": ["info", "plain"]}
        ),
        ApiKey.model_validate(
            {"name": "solo", "key": SOLO["Authorization"][7:], "models": ["plain"]}
        ),
    ]
    settings = fast_settings(tmp_path, models, keys)
    return create_app(settings, engines=Maker(), inventory=cpu_inventory(4))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """``info`` and ``other`` set enable_tokenizer_info_endpoint; ``plain`` does not."""
    app = app_with(tmp_path, "info", "other")
    with TestClient(app) as test_client:
        supervisor = app.state.appliance.supervisor
        test_client.portal.call(supervisor.wait_autoload)  # type: ignore[union-attr]
        yield test_client


def test_a_named_model_answers_with_vllms_body(client: TestClient) -> None:
    got = client.get("/tokenizer_info", params={"model": "info"}, headers=ADMIN)
    assert got.status_code == 200, got.text
    assert got.json() == {"tokenizer_class": "PreTrainedTokenizerFast", "name_or_path": FOLDER}
    engine = client.app.state.appliance.supervisor.get("info").engine  # type: ignore[attr-defined]
    call = engine.calls[-1]
    # The query's model is the appliance's: vLLM's route takes none.
    assert (call.route, call.method, call.path, call.query) == (
        "GET /tokenizer_info",
        "GET",
        "/tokenizer_info",
        b"",
    )


def test_without_a_model_the_one_the_key_may_use(client: TestClient) -> None:
    # The user key may use info and plain: only info has the setting.
    got = client.get("/tokenizer_info", headers=USER)
    assert got.status_code == 200, got.text
    # Not an admin: where the tokenizer was read from on this host is the model's name.
    assert got.json()["name_or_path"] == "info"
    # The admin may use info and other: both serve it, so one must be named.
    several = client.get("/tokenizer_info", headers=ADMIN)
    assert several.status_code == 400
    assert "info, other" in several.json()["error"]["message"]


def test_refusals(client: TestClient) -> None:
    plain = client.get("/tokenizer_info", params={"model": "plain"}, headers=ADMIN)
    assert plain.status_code == 400
    assert "enable_tokenizer_info_endpoint" in plain.json()["error"]["message"]
    hidden = client.get("/tokenizer_info", params={"model": "other"}, headers=USER)
    assert hidden.status_code in (403, 404), hidden.text
    assert client.get("/tokenizer_info", params={"model": "nope"}, headers=ADMIN).status_code == 404
    assert client.get("/tokenizer_info").status_code == 401
    # Others are still served.
    assert client.get("/tokenizer_info", params={"model": "info"}, headers=USER).status_code == 200


def test_no_model_with_the_setting(tmp_path: Path) -> None:
    with TestClient(app_with(tmp_path)) as test_client:
        got = test_client.get("/tokenizer_info", headers=ADMIN)
        assert got.status_code == 400
        assert "enable_tokenizer_info_endpoint: true" in got.json()["error"]["message"]


def test_the_setting_is_read_from_the_entry() -> None:
    assert route_enabled({"enable_tokenizer_info_endpoint": True}, TOKENIZER_INFO)
    assert route_enabled({"enable-tokenizer-info-endpoint": True}, TOKENIZER_INFO)
    assert not route_enabled({"enable_tokenizer_info_endpoint": "yes"}, TOKENIZER_INFO)
    assert not route_enabled({}, TOKENIZER_INFO)


# --- /tokenize and /detokenize without a model (lm-eval's remote tokenizer sends none) -------


def test_tokenize_without_a_model_goes_to_the_keys_one_model(client: TestClient) -> None:
    supervisor = client.app.state.appliance.supervisor  # type: ignore[attr-defined]
    body = {"prompt": "hello", "add_special_tokens": False}
    got = client.post("/tokenize", json=body, headers=SOLO)
    assert got.status_code == 200, got.text
    call = supervisor.get("plain").engine.calls[-1]
    # The engine is told the model, as vllm serve's one model answers a body without one.
    assert call.route == "POST /tokenize"
    assert json.loads(call.body) == {**body, "model": "plain"}
    # A body with "model": null is one without a model too (vLLM's field is optional).
    nulled = client.post("/tokenize", json={**body, "model": None}, headers=SOLO)
    assert nulled.status_code == 200, nulled.text


def test_tokenize_without_a_model_with_several_names_the_choice(client: TestClient) -> None:
    for path in ("/tokenize", "/detokenize"):
        got = client.post(path, json={"prompt": "hello", "tokens": [1]}, headers=USER)
        assert got.status_code == 400, got.text
        error = got.json()["error"]
        assert error["param"] == "model" and "info, plain" in error["message"], error
    # A named model is still served.
    named = client.post("/tokenize", json={"model": "info", "prompt": "hi"}, headers=USER)
    assert named.status_code == 200, named.text


def test_only_tokenize_and_detokenize_may_leave_the_model_out(client: TestClient) -> None:
    got = client.post("/pooling", json={"input": "hello"}, headers=SOLO)
    assert got.status_code == 400 and got.json()["error"]["param"] == "model", got.text
