"""Issue 11: the appliance mounts every model route that vLLM 0.32's own server registers.

vLLM's app is built here with vLLM's own ``build_app`` for each kind of model (generate, embed,
classify, cross-encoder, speech), so a route vLLM adds or drops in a later release fails this
test until the route table (and the README) says what the appliance does with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from appliance.api.openai_routes import build_model_list_router, build_openai_router
from appliance.api.tokenizer_info import build_tokenizer_info_router
from appliance.api.vllm_routes import build_table_routes, build_vllm_router, endpoint_label
from appliance.engines.route_table import (
    ENGINE_ROUTES,
    MODEL_ROUTES,
    NOT_MOUNTED,
    OPTIONAL_ROUTES,
    RESPONSE_ID_ROUTES,
    VERSION_PATH,
    is_model_route,
)

README = Path(__file__).resolve().parents[2] / "README.md"


class _FakeModelConfig:
    """What vLLM's route registration reads of a model's config."""

    def __init__(self, pooling_task: str | None, num_labels: int = 1) -> None:
        self.pooling_task = pooling_task
        self.hf_config = SimpleNamespace(num_labels=num_labels)
        self.architecture = "Fake"

    def get_pooling_task(self, supported_tasks: tuple[str, ...]) -> str | None:
        return self.pooling_task


KINDS: dict[str, tuple[tuple[str, ...], Any]] = {
    "generate": (("generate",), None),
    "embed": (("embed", "token_embed"), _FakeModelConfig("embed")),
    "classify": (("classify", "token_classify"), _FakeModelConfig("classify", num_labels=3)),
    "cross-encoder": (("classify", "token_classify"), _FakeModelConfig("classify")),
    "speech": (("generate", "transcription"), None),
}


def _vllm_routes(tasks: tuple[str, ...], model_config: Any, *flags: str) -> set[tuple[str, str]]:
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "unused", *flags])
    app = build_app(args, tasks, model_config)  # type: ignore[arg-type]
    found = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


@pytest.fixture(scope="module")
def vllm_routes() -> dict[str, set[tuple[str, str]]]:
    routes = {kind: _vllm_routes(*shape) for kind, shape in KINDS.items()}
    # The routes vLLM registers only when asked, each with its flag (issue 28).
    for route, setting in OPTIONAL_ROUTES.items():
        flag = "--" + setting.replace("_", "-")
        routes[f"generate {flag}"] = _vllm_routes(*KINDS["generate"], flag)
        assert (route.method, route.path) in routes[f"generate {flag}"], route.key
    return routes


def _appliance_routes() -> set[tuple[str, str]]:
    app = FastAPI()
    app.include_router(build_openai_router(MagicMock(), MagicMock()))
    app.include_router(build_model_list_router(MagicMock()))
    app.include_router(build_vllm_router(MagicMock(), MagicMock()))
    app.include_router(build_table_routes(MagicMock(), MagicMock(), MagicMock(), version="0"))
    app.include_router(build_tokenizer_info_router(MagicMock(), MagicMock(), MagicMock()))
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }


def test_every_vllm_route_is_mounted_or_listed_as_not_mounted(
    vllm_routes: dict[str, set[tuple[str, str]]],
) -> None:
    mounted = _appliance_routes()
    for kind, routes in vllm_routes.items():
        for method, path in sorted(routes):
            assert (method, path) in mounted or path in NOT_MOUNTED, (
                f"vLLM registers {method} {path} for a {kind} model: mount it "
                "(appliance/engines/route_table.py) or say why not in NOT_MOUNTED"
            )


def test_every_mounted_model_route_is_one_vllm_registers(
    vllm_routes: dict[str, set[tuple[str, str]]],
) -> None:
    registered = set().union(*vllm_routes.values())
    for route in (*MODEL_ROUTES, *RESPONSE_ID_ROUTES, *OPTIONAL_ROUTES):
        assert (route.method, route.path) in registered, f"{route.key}: vLLM has no such route"
    assert ("GET", VERSION_PATH) in registered
    for path in NOT_MOUNTED:
        assert any(p == path for _, p in registered), f"{path}: vLLM has no such route"


def test_the_route_table_is_what_is_mounted() -> None:
    mounted = _appliance_routes()
    table = {(r.method, r.path) for r in (*MODEL_ROUTES, *RESPONSE_ID_ROUTES, *OPTIONAL_ROUTES)}
    assert table | {("GET", VERSION_PATH), ("GET", "/v1/models")} == mounted


def test_the_readme_lists_every_mounted_route() -> None:
    text = README.read_text()
    section = text[text.index("### Endpoints") :]
    section = section[: section.index("\n## ")]
    listed = set(re.findall(r"`((?:GET|POST) /[^`]*)`", section))
    for route in (*MODEL_ROUTES, *RESPONSE_ID_ROUTES, *OPTIONAL_ROUTES):
        assert route.key in listed, f"README's endpoint list lacks {route.key}"
    assert f"GET {VERSION_PATH}" in listed
    for path in NOT_MOUNTED:
        assert f"`{path}`" in section, f"README does not say why {path} is not mounted"


def test_model_routes_outside_v1_need_a_user_key() -> None:
    for route in ENGINE_ROUTES:
        assert is_model_route(route.path)
    assert is_model_route("/v1/responses/resp_1/cancel")
    assert is_model_route("/tokenizer_info")
    assert not is_model_route("/health")


def test_metrics_label_of_a_route() -> None:
    assert endpoint_label("/v1/responses") == "responses"
    assert endpoint_label("/tokenize") == "tokenize"
    assert endpoint_label("/v2/rerank") == "v2/rerank"


def test_the_docs_describe_the_new_routes() -> None:
    app = FastAPI()
    app.include_router(build_vllm_router(MagicMock(), MagicMock()))
    app.include_router(build_table_routes(MagicMock(), MagicMock(), MagicMock(), version="0"))
    paths = app.openapi()["paths"]
    assert "requestBody" in paths["/tokenize"]["post"]
    assert "/v1/responses/{response_id}" in paths and "/version" in paths
