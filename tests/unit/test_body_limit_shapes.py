"""Issue 28: the request-context middleware's own refusals (413 body too large, 408 body too
slow) answer in the shape of the route family asked: Ollama's ``{"error": "..."}`` under
``/api/``, the OpenAI envelope elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from appliance.api.error_handlers import register_error_handlers
from appliance.api.middleware import RequestContextMiddleware

LIMIT = 1024


def _app() -> FastAPI:
    app = FastAPI()
    register_error_handlers(app)

    async def echo(request: Request) -> dict[str, Any]:
        return {"bytes": len(await request.body())}

    for path in ("/api/chat", "/v1/chat/completions"):
        app.add_api_route(path, echo, methods=["POST"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=LIMIT, body_timeout=0.2)
    return app


def _post(path: str, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content, headers=headers or {})

    return asyncio.run(go())


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * 512  # no Content-Length: the limit is found while the body is read


async def _stalled() -> AsyncIterator[bytes]:
    yield b'{"model": '
    await asyncio.Event().wait()  # never set: the upload stalls


def _assert_shape(path: str, response: httpx.Response, code: str) -> None:
    error = response.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and error, response.text
    else:
        assert error["code"] == code and error["type"] == "invalid_request_error", response.text


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_declared_oversized_body_is_refused_in_the_routes_shape(path: str) -> None:
    response = _post(path, b"x" * (LIMIT + 1))
    assert response.status_code == 413
    _assert_shape(path, response, "body_too_large")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_that_grows_past_the_limit_is_refused_in_the_routes_shape(path: str) -> None:
    response = _post(path, _chunks(4))
    assert response.status_code == 413
    _assert_shape(path, response, "body_too_large")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_stalled_body_is_refused_in_the_routes_shape(path: str) -> None:
    response = _post(path, _stalled(), {"Content-Type": "application/json"})
    assert response.status_code == 408
    _assert_shape(path, response, "body_timeout")


def test_a_body_within_the_limit_is_served() -> None:
    assert _post("/api/chat", b"x" * LIMIT).json() == {"bytes": LIMIT}
