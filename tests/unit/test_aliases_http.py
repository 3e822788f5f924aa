"""Aliases through the /v1 routes: resolution, the name the engine sees, per-key model lists,
GET /v1/models with and without listed aliases. A fake remote engine stands in for a backend;
the supervisor, router, routes, auth and middleware are the real ones."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fastapi import FastAPI

from appliance.api.auth import ApiKey, AuthConfig, AuthMiddleware, Role
from appliance.api.error_handlers import register_error_handlers
from appliance.api.middleware import RequestContextMiddleware
from appliance.api.model_access import TableAccess
from appliance.api.openai_routes import build_model_list_router, build_openai_router
from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.registry_client import CatalogueSource
from appliance.catalogue.schema import RemoteModelSpec, parse_model_spec
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.host.inventory import cpu_inventory
from appliance.metrics import Metrics
from appliance.router import Router
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.supervisor import Supervisor
from tests.fakes import FakeBackend, FakeMaker

ALICE = "sk-alice-0123456789"  # may use "fast" only: an alias of "far"
BOB = "sk-bob-0123456789"  # may use "other" only


class EchoBackend(FakeBackend):
    """Answers with the model name it was handed, as vLLM names the served model."""

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        return JSONReply(200, json.dumps({"model": body["model"], "object": "x"}).encode())


class Remotes:
    def get(self, spec: RemoteModelSpec) -> EchoBackend:
        return EchoBackend()

    def health(self, spec: RemoteModelSpec) -> dict[str, Any]:
        return {"up": True, "breaker": "closed", "last_error": None}


SPECS = [
    parse_model_spec(
        {"name": "far", "backend_url": "http://box-a:8000", "aliases": ["gpt-4o-mini", "fast"]}
    ),
    parse_model_spec({"name": "other", "backend_url": "http://box-b:8000"}),
]


def calls(list_aliases: bool, requests: list[tuple[str, str, str | None, Any]]) -> list[Any]:
    """Run ``(method, path, key, json)`` requests against a fresh app; their responses."""

    async def main() -> list[httpx.Response]:
        supervisor = Supervisor(
            cpu_inventory(8), FakeMaker(), limits=SupervisorLimits(), remotes=Remotes()
        )
        await supervisor.start(SPECS)
        catalogue = Catalogue(SPECS, CatalogueSource.FILE)
        metrics = Metrics(catalogue=catalogue, supervisor=supervisor)
        app = FastAPI()
        register_error_handlers(app)
        router = Router(catalogue, supervisor)
        app.include_router(build_openai_router(TableAccess(router, metrics), metrics))
        app.include_router(build_model_list_router(router, list_aliases=list_aliases))
        keys = [
            ApiKey.model_validate({"name": "alice", "key": ALICE, "models": ["fast"]}),
            ApiKey.model_validate({"name": "bob", "key": BOB, "models": ["other"]}),
            ApiKey.model_validate({"name": "ops", "key": "sk-ops-0123456789", "role": Role.ADMIN}),
        ]
        app.add_middleware(AuthMiddleware, config=AuthConfig(keys=keys))
        app.add_middleware(RequestContextMiddleware, max_body_bytes=2**20)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
        out = []
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                for method, path, key, body in requests:
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    out.append(await c.request(method, path, headers=headers, json=body))
        finally:
            await supervisor.shutdown()
        return out

    return asyncio.run(main())


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_an_alias_is_served_as_its_model_and_answered_under_the_models_name() -> None:
    for_alias, for_name, unknown = calls(
        False,
        [
            ("POST", "/v1/chat/completions", ALICE, chat("gpt-4o-mini")),
            ("POST", "/v1/completions", ALICE, {"model": "far", "prompt": "x"}),
            ("POST", "/v1/chat/completions", "sk-ops-0123456789", chat("gpt-4o")),
        ],
    )
    # vllm serve --served-model-name far gpt-4o-mini answers "far" whichever name was asked.
    assert for_alias.status_code == 200 and for_alias.json()["model"] == "far"
    assert for_name.status_code == 200 and for_name.json()["model"] == "far"
    assert unknown.status_code == 404


def test_a_key_that_lists_one_name_of_a_model_may_use_it_by_any_name() -> None:
    alice, bob = calls(
        False,
        [
            ("POST", "/v1/chat/completions", ALICE, chat("gpt-4o-mini")),
            ("POST", "/v1/chat/completions", BOB, chat("fast")),
        ],
    )
    assert alice.status_code == 200
    assert bob.status_code == 403


def test_aliases_are_listed_in_v1_models_only_when_asked() -> None:
    (plain,) = calls(False, [("GET", "/v1/models", ALICE, None)])
    assert [m["id"] for m in plain.json()["data"]] == ["far"]
    listed, for_bob = calls(
        True, [("GET", "/v1/models", ALICE, None), ("GET", "/v1/models", BOB, None)]
    )
    data = listed.json()["data"]
    assert [m["id"] for m in data] == ["far", "gpt-4o-mini", "fast"]
    assert {m.get("alias_of") for m in data[1:]} == {"far"}
    assert [m["id"] for m in for_bob.json()["data"]] == ["other"]
