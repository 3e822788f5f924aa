"""A remote backend is untrusted: its garbage usage, error bodies and sizes cannot hurt.

The backend is an httpx mock transport answering what each test sets; the requests come as
a route passes them, with or without the caller's right to see backend details.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.requests import Request as StarletteRequest

from appliance.catalogue.schema import RemoteModelSpec
from appliance.engines.base import Endpoint, JSONReply, RouteCall, Usage
from appliance.engines.remote import DETAIL_SCOPE, RemoteEngine, RemoteSettings
from appliance.engines.usage import usage_in_event
from appliance.errors import BackendError

pytestmark = pytest.mark.anyio
URL = "http://10.1.2.3:8000"
SETTINGS = RemoteSettings(health_interval=None, connect_retries=0, max_reply_bytes=4096)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def request(detail: bool | None) -> StarletteRequest:
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/", "headers": []}
    if detail is not None:
        scope[DETAIL_SCOPE] = detail
    return StarletteRequest(scope)


async def answer(
    handler: Callable[[httpx.Request], httpx.Response], detail: bool | None = None
) -> JSONReply:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        engine = RemoteEngine(RemoteModelSpec(name="r", backend_url=URL), client, SETTINGS)
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "r"}), request(detail)
        )
    assert isinstance(reply, JSONReply)
    return reply


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "many", "completion_tokens": [1]},
        {"prompt_tokens": -5, "completion_tokens": 1e300},
        {"prompt_tokens": True, "completion_tokens": None},
        {"prompt_tokens": 10**30},
        [1, 2],
        "usage",
        None,
    ],
)
async def test_garbage_usage_neither_breaks_the_request_nor_counts(usage: Any) -> None:
    body = json.dumps({"choices": [], "usage": usage}).encode()
    reply = await answer(lambda _: httpx.Response(200, content=body))
    assert reply.status_code == 200 and reply.body == body
    assert reply.usage in (None, Usage(0, 0))


async def test_deeply_nested_usage_is_not_a_500() -> None:
    # Nested past the JSON parser's recursion limit: the reply goes through, nothing counted.
    deep = b"[" * 2000 + b"]" * 2000  # within the reply cap
    body = b'{"choices": [], "usage": ' + deep + b"}"
    reply = await answer(lambda _: httpx.Response(200, content=body))
    assert reply.status_code == 200 and reply.body == body and reply.usage is None
    # The same in a stream's events, which the routes read for per-key usage.
    event = b'data: {"usage": ' + deep + b"}\n\n"
    assert usage_in_event(event) is None
    assert usage_in_event(b'data: {"response": ' + deep + b"}\n\n") is None
    assert usage_in_event(b'data: {"usage": [1, 2]}\n\n') is None


def test_usage_keeps_sane_counts() -> None:
    assert Usage.of({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4)
    assert Usage(-1, 2) == Usage(0, 2)


async def test_upstream_error_text_is_not_shown_to_users() -> None:
    secret = "Traceback: /srv/internal/secret.py line 3 password=hunter2"
    reply = await answer(lambda _: httpx.Response(500, text=secret), detail=False)
    error = json.loads(reply.body)["error"]
    assert reply.status_code == 502
    assert "hunter2" not in reply.body.decode() and URL not in reply.body.decode()
    assert error["message"] == "model 'r': its backend answered 500"


async def test_upstream_error_text_reaches_admins_cleaned() -> None:
    reply = await answer(lambda _: httpx.Response(500, text="boom\x1b[31m\x00"), detail=True)
    message = json.loads(reply.body)["error"]["message"]
    assert URL in message and "boom" in message and "\x1b" not in message


async def test_an_upstream_envelope_is_rebuilt_not_passed_through() -> None:
    upstream = {
        "error": {"message": "x" * 3000 + "\x07", "type": ["odd"], "code": 7, "param": None},
        "extra": "<script>",
    }
    reply = await answer(lambda _: httpx.Response(503, json=upstream), detail=False)
    body = json.loads(reply.body)
    assert reply.status_code == 503 and set(body) == {"error"}
    error = body["error"]
    assert len(error["message"]) <= 1003 and "\x07" not in error["message"]
    assert error["type"] == "backend_error" and error["code"] == 7


async def test_a_reply_over_the_cap_is_refused() -> None:
    huge = b'{"data": "' + b"x" * 10_000 + b'"}'
    with pytest.raises(BackendError, match="more than 4096 bytes") as caught:
        await answer(lambda _: httpx.Response(200, content=huge), detail=False)
    assert URL not in caught.value.message


async def test_connection_failures_do_not_name_the_backend_to_users() -> None:
    def refuse(_: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connect to 10.1.2.3:8000 refused")

    with pytest.raises(BackendError) as caught:
        await answer(refuse, detail=False)
    assert caught.value.status_code == 503 and "10.1.2.3" not in caught.value.message


# -- connections to registry backends check the address they connect to --------------------


async def test_untrusted_backends_check_the_address_at_connect_time() -> None:
    """A name that resolves to loopback when the connection is made (as after DNS rebinding)
    is refused for registry backends, and reached for models.yaml's own."""
    import asyncio

    from appliance.engines.remote import RemoteBackends

    accepted = 0
    answer = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}"
        writer.write(head.encode() + b"\r\nConnection: close\r\n\r\n" + answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = RemoteModelSpec(name="r", backend_url=f"http://localhost:{port}")
    backends = RemoteBackends(
        SETTINGS, guard=lambda a: "a loopback address" if a.is_loopback else None
    )
    try:
        await backends.sync([spec], untrusted=True)
        with pytest.raises(BackendError, match="refused"):
            await backends.get(spec).serve(
                RouteCall.of_endpoint(Endpoint.CHAT, {"model": "r"}), request(True)
            )
        assert accepted == 0
        await backends.sync([spec], untrusted=False)  # the same entry from models.yaml
        reply = await backends.get(spec).serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "r"}), request(True)
        )
        assert isinstance(reply, JSONReply) and reply.status_code == 200 and accepted == 1
    finally:
        await backends.close()
        server.close()
        await server.wait_closed()
