"""The remote backend against a real upstream: a small OpenAI-like server on a loopback port.

The upstream (FastAPI under uvicorn, in a background thread) answers by the request's
``model``: JSON, SSE with delays, errors with and without the envelope, a slow answer, and
answers that drop the connection. It records what it saw and whether a stream was cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import Request as StarletteRequest

from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.engines.base import Endpoint, JSONReply, RouteCall, StreamReply, Usage, model_card_of
from appliance.engines.circuit_breaker import BreakerState, CircuitBreaker
from appliance.engines.remote import (
    RemoteBackends,
    RemoteEngine,
    RemoteSettings,
)
from appliance.errors import BackendError, BackendTimeoutError, BackendUnavailableError

pytestmark = pytest.mark.anyio

# Bytes with odd spacing, key order and non-ASCII: a re-encoding proxy would change them.
JSON_ANSWER = (
    b'{ "id":"cmpl-1",  "object":"chat.completion", "model":"echo",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"h\\u00e9llo \xc3\xa9"}}],'
    b'"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}'
)
BAD_REQUEST = {
    "error": {
        "message": "max_tokens too big",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}


@dataclass
class Seen:
    """What the upstream saw, shared with the test thread."""

    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)  # the ``tag`` of each stream sent whole
    cancelled: set[str] = field(default_factory=set)  # ... and of each one cut short

    def count(self, model: str) -> int:
        return sum(1 for _, _, body in self.requests if body.get("model") == model)


def upstream_app(seen: Seen) -> FastAPI:
    """An OpenAI-like server; what it answers depends on the request's ``model``."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        seen.paths.append("/health")  # then 404, as on a server with no /health
        return Response(status_code=404)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        seen.paths.append("/v1/models")
        return JSONResponse({"object": "list", "data": []})

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        body = await request.json()
        seen.requests.append((request.url.path, dict(request.headers), body))
        model = body["model"]
        if model == "echo":
            return Response(JSON_ANSWER, media_type="application/json")
        if model == "bad-request":
            return JSONResponse(BAD_REQUEST, status_code=400)
        if model == "plain-500":
            return PlainTextResponse("boom", status_code=500)
        if model == "slow":
            await asyncio.sleep(body.get("delay", 2.0))
            return Response(JSON_ANSWER, media_type="application/json")
        if model == "drop-body":
            return StreamingResponse(_drop(0), media_type="application/json")
        if model == "drop-stream":
            return StreamingResponse(_drop(2), media_type="text/event-stream")
        return StreamingResponse(
            _events(seen, body.get("tag", ""), body.get("chunks", 3), body.get("delay", 0.0)),
            media_type="text/event-stream",
        )

    @app.post("/tokenize")
    @app.post("/v1/messages")
    async def other_route(request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        seen.requests.append((request.url.path, dict(request.headers), body))
        if body.get("stream"):
            return StreamingResponse(
                _events(seen, body.get("tag", ""), 2, 0.0), media_type="text/event-stream"
            )
        return Response(raw, media_type="application/json")

    @app.get("/v1/responses/{response_id}")
    async def stored(response_id: str, request: Request) -> JSONResponse:
        seen.paths.append(f"{request.url.path}?{request.url.query}")
        return JSONResponse({"id": response_id}, status_code=404)

    return app


async def _events(seen: Seen, tag: str, chunks: int, delay: float) -> AsyncIterator[bytes]:
    finished = False
    try:
        for i in range(chunks):
            yield f'data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}]}}\n\n'.encode()
            await asyncio.sleep(delay)
        yield b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        (seen.finished if finished else seen.cancelled).add(tag)


async def _drop(events: int) -> AsyncIterator[bytes]:
    for i in range(events):
        yield f'data: {{"n":{i}}}\n\n'.encode()
        await asyncio.sleep(0.01)
    # Raising after the headers went out makes uvicorn cut the connection mid-body.
    raise RuntimeError("upstream died")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Upstream:
    """The upstream app under uvicorn in a daemon thread."""

    def __init__(self, port: int | None = None) -> None:
        self.seen = Seen()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            upstream_app(self.seen),
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> Upstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "upstream did not start"
            assert self._thread.is_alive(), "upstream thread died"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine uses asyncio tasks, as the appliance does


class CountingTransport(httpx.AsyncBaseTransport):
    """The real transport, counting the attempts the engine makes (to see its retries)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


FAST = RemoteSettings(connect_retries=2, health_interval=None)


@contextlib.asynccontextmanager
async def remote(
    url: str, settings: RemoteSettings = FAST, name: str = "echo"
) -> AsyncIterator[tuple[RemoteEngine, CountingTransport]]:
    """A started engine for ``name`` at ``url`` on its own counted client."""
    transport = CountingTransport()
    async with httpx.AsyncClient(transport=transport) as client:
        engine = RemoteEngine(RemoteModelSpec(name=name, backend_url=url), client, settings)
        await engine.start()
        try:
            yield engine, transport
        finally:
            await engine.stop()


def incoming(headers: dict[str, str] | None = None) -> StarletteRequest:
    """The client's request as a route would pass it."""
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return StarletteRequest(
        {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}
    )


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until true or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def error_of(reply: JSONReply) -> dict[str, Any]:
    body = json.loads(reply.body)
    assert set(body) == {"error"}
    return dict(body["error"])


# -- JSON ------------------------------------------------------------------------------------


async def test_json_answer_passes_through_byte_for_byte(upstream: Upstream) -> None:
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo", "messages": []}), incoming()
        )
    assert isinstance(reply, JSONReply)
    assert reply.status_code == 200
    assert reply.body == JSON_ANSWER
    assert reply.usage == Usage(7, 3)
    assert engine.stats().running == 0


async def test_request_id_forwarded_and_client_key_not(upstream: Upstream, monkeypatch) -> None:
    monkeypatch.setenv("TEST_BACKEND_KEY", "backend-secret")
    settings = RemoteSettings(health_interval=None, api_key_envs={"echo": "TEST_BACKEND_KEY"})
    headers = {"X-Request-Id": "req-42", "Authorization": "Bearer client-key"}
    async with remote(upstream.url, settings) as (engine, _):
        body = {"model": "echo", "messages": [], "temperature": 0.5}
        await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming(headers))
    path, seen_headers, seen_body = upstream.seen.requests[-1]
    assert path == "/v1/chat/completions"
    assert seen_headers["x-request-id"] == "req-42"
    assert seen_headers["authorization"] == "Bearer backend-secret"
    assert seen_body == body


async def test_upstream_envelope_error_passes_through(upstream: Upstream) -> None:
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.COMPLETIONS, {"model": "bad-request"}), incoming()
        )
    assert isinstance(reply, JSONReply)
    assert reply.status_code == 400
    assert json.loads(reply.body) == BAD_REQUEST
    assert engine.breaker.failures == 0  # a client mistake says nothing about the backend


async def test_upstream_plain_500_becomes_502_envelope(upstream: Upstream) -> None:
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "plain-500"}), incoming()
        )
    assert isinstance(reply, JSONReply)
    assert reply.status_code == 502
    error = error_of(reply)
    assert error["code"] == "backend_error"
    assert "boom" in error["message"] and upstream.url in error["message"]
    assert engine.breaker.failures == 1


# -- vLLM's other routes (issue 11) ----------------------------------------------------------


async def test_other_routes_pass_through_with_body_untouched(upstream: Upstream) -> None:
    raw = b'{"model":"echo",  "prompt":"h\u00e9"}'
    call = RouteCall("POST /tokenize", "POST", "/tokenize", body=raw, request_id="req-7")
    async with remote(upstream.url) as (engine, _):
        assert engine.routes() is None and model_card_of(engine) is None
        reply = await engine.serve(call, incoming({"X-Request-Id": "req-7"}))
    assert isinstance(reply, JSONReply) and reply.status_code == 200
    assert reply.body == raw
    path, headers, _ = upstream.seen.requests[-1]
    assert path == "/tokenize" and headers["x-request-id"] == "req-7"


async def test_other_routes_stream_when_the_backend_streams(upstream: Upstream) -> None:
    body = json.dumps({"model": "echo", "stream": True, "tag": "messages"}).encode()
    call = RouteCall("POST /v1/messages", "POST", "/v1/messages", body=body, stream=True)
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(call, incoming())
        assert isinstance(reply, StreamReply)
        chunks = [chunk async for chunk in reply.chunks]
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")


async def test_a_get_route_keeps_its_query_and_status(upstream: Upstream) -> None:
    call = RouteCall(
        "GET /v1/responses/{response_id}", "GET", "/v1/responses/resp_1", query=b"stream=false"
    )
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(call, incoming())
    assert isinstance(reply, JSONReply) and reply.status_code == 404
    assert upstream.seen.paths[-1] == "/v1/responses/resp_1?stream=false"


# -- streams ---------------------------------------------------------------------------------


async def test_stream_chunks_arrive_before_upstream_finishes(upstream: Upstream) -> None:
    body = {"model": "stream", "stream": True, "tag": "incremental", "chunks": 5, "delay": 0.2}
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming())
        assert isinstance(reply, StreamReply)
        first = await reply.chunks.__anext__()
        assert first.startswith(b'data: {"choices"')
        assert "incremental" not in upstream.seen.finished  # nothing was buffered
        rest = [chunk async for chunk in reply.chunks]
        assert engine.stats().running == 0
    joined = first + b"".join(rest)
    assert joined.endswith(b"data: [DONE]\n\n")
    assert joined.count(b"data: ") == 7
    assert "incremental" in upstream.seen.finished


async def test_stream_error_before_first_byte_is_json(upstream: Upstream) -> None:
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "bad-request", "stream": True}),
            incoming(),
        )
    assert isinstance(reply, JSONReply) and reply.status_code == 400
    assert json.loads(reply.body) == BAD_REQUEST


async def test_client_leaving_early_cancels_the_upstream_stream(upstream: Upstream) -> None:
    body = {"model": "stream", "stream": True, "tag": "leave-early", "chunks": 50, "delay": 0.1}
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming())
        assert isinstance(reply, StreamReply)
        await reply.chunks.__anext__()
        await reply.chunks.aclose()  # type: ignore[attr-defined]
        await until(lambda: "leave-early" in upstream.seen.cancelled)
        assert engine.stats().running == 0


async def test_cancelled_consumer_then_close_cancels_upstream(upstream: Upstream) -> None:
    body = {
        "model": "stream",
        "stream": True,
        "tag": "cancelled-consumer",
        "chunks": 50,
        "delay": 0.1,
    }
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming())
        assert isinstance(reply, StreamReply)
        got: list[bytes] = []

        async def consume() -> None:
            async for chunk in reply.chunks:
                got.append(chunk)

        task = asyncio.ensure_future(consume())
        await until(lambda: len(got) >= 2)
        task.cancel()  # the route's task, when the client disconnects
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reply.chunks.aclose()  # type: ignore[attr-defined]
        await until(lambda: "cancelled-consumer" in upstream.seen.cancelled)
        assert engine.stats().running == 0


async def test_unstarted_stream_closed_releases_upstream(upstream: Upstream) -> None:
    body = {"model": "stream", "stream": True, "tag": "unstarted", "chunks": 50, "delay": 0.1}
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming())
        assert isinstance(reply, StreamReply)
        await reply.chunks.aclose()  # type: ignore[attr-defined]
        await until(lambda: "unstarted" in upstream.seen.cancelled)
        assert engine.stats().running == 0


async def test_upstream_dropping_mid_stream_ends_with_error_event(upstream: Upstream) -> None:
    async with remote(upstream.url) as (engine, _):
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "drop-stream", "stream": True}),
            incoming(),
        )
        assert isinstance(reply, StreamReply)
        chunks = [chunk async for chunk in reply.chunks]
    joined = b"".join(chunks)
    assert joined.startswith(b'data: {"n":0}\n\n')
    last = joined.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ")
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == "backend_error" and upstream.url in error["message"]
    assert engine.breaker.failures == 1


# -- failures --------------------------------------------------------------------------------


async def test_connection_refused_is_503_quickly_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with remote(url) as (engine, transport):
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo"}), incoming())
        assert time.monotonic() - started < 1.0
    assert caught.value.status_code == 503
    assert "'echo'" in caught.value.message and url in caught.value.message
    assert transport.attempts == 1 + FAST.connect_retries


async def test_read_timeout_is_504_and_not_retried(upstream: Upstream) -> None:
    settings = RemoteSettings(total_timeout=0.3, health_interval=None)
    before = upstream.seen.count("slow")
    async with remote(upstream.url, settings) as (engine, transport):
        with pytest.raises(BackendTimeoutError) as caught:
            await engine.serve(
                RouteCall.of_endpoint(Endpoint.CHAT, {"model": "slow", "delay": 2}), incoming()
            )
    assert caught.value.status_code == 504
    assert transport.attempts == 1
    assert upstream.seen.count("slow") == before + 1


async def test_stream_silence_past_read_timeout_ends_with_error_event(upstream: Upstream) -> None:
    settings = RemoteSettings(read_timeout=0.2, health_interval=None)
    body = {"model": "stream", "stream": True, "chunks": 3, "delay": 1.0}
    async with remote(upstream.url, settings) as (engine, _):
        reply = await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, body), incoming())
        assert isinstance(reply, StreamReply)
        chunks = [chunk async for chunk in reply.chunks]
    error = json.loads(chunks[-1].strip()[len(b"data: ") :])["error"]
    assert error["code"] == "backend_timeout"


async def test_drop_after_request_reached_upstream_is_502_not_retried(upstream: Upstream) -> None:
    before = upstream.seen.count("drop-body")
    async with remote(upstream.url) as (engine, transport):
        with pytest.raises(BackendError) as caught:
            await engine.serve(
                RouteCall.of_endpoint(Endpoint.COMPLETIONS, {"model": "drop-body"}), incoming()
            )
    assert type(caught.value) is BackendError and caught.value.status_code == 502
    assert transport.attempts == 1
    assert upstream.seen.count("drop-body") == before + 1


# -- breaker and health ----------------------------------------------------------------------


async def test_breaker_opens_answers_instantly_then_recovers() -> None:
    port = free_port()
    settings = RemoteSettings(
        connect_retries=0, failure_threshold=2, cool_down=0.5, health_interval=None
    )
    async with remote(f"http://127.0.0.1:{port}", settings) as (engine, transport):
        for _ in range(2):
            with pytest.raises(BackendUnavailableError):
                await engine.serve(
                    RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo"}), incoming()
                )
        assert engine.breaker.state is BreakerState.OPEN and not engine.up
        attempts = transport.attempts
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            await engine.serve(RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo"}), incoming())
        assert time.monotonic() - started < 0.1
        assert transport.attempts == attempts  # no network touched
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 0.5

        server = Upstream(port).start()
        try:
            await until(lambda: engine.breaker.state is BreakerState.HALF_OPEN)
            reply = await engine.serve(
                RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo"}), incoming()
            )
            assert isinstance(reply, JSONReply) and reply.status_code == 200
            assert engine.breaker.state is BreakerState.CLOSED and engine.up
        finally:
            server.stop()


def test_breaker_half_open_lets_one_probe_and_reopens_on_failure() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.admit() is None
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.admit() == 10.0
    now[0] = 10.0
    assert breaker.admit() is None  # the probe
    assert breaker.admit() == 1.0  # others wait for it
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    now[0] = 20.0
    assert breaker.admit() is None
    breaker.release()  # the probe's client left: another may probe
    assert breaker.admit() is None
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


async def test_health_check_falls_back_to_models_and_tracks_up(upstream: Upstream) -> None:
    settings = RemoteSettings(health_interval=0.05, failure_threshold=2)
    async with remote(upstream.url, settings) as (engine, _):
        await until(lambda: "/v1/models" in upstream.seen.paths and engine._healthy is True)
        assert engine.up and "/health" in upstream.seen.paths  # tried first, 404 there
    async with remote(f"http://127.0.0.1:{free_port()}", settings) as (engine, _):
        await until(lambda: engine.breaker.state is BreakerState.OPEN)
        assert not engine.up and not engine.is_alive()
        assert engine.last_error is not None and "health check" in engine.last_error


# -- the set of backends ---------------------------------------------------------------------


async def test_backends_sync_get_status_and_close(upstream: Upstream) -> None:
    backends = RemoteBackends(RemoteSettings(health_interval=0.05))
    local = LocalModelSpec(name="local", source="/models/x")
    a = RemoteModelSpec(name="a", backend_url=upstream.url)
    b = RemoteModelSpec(name="b", backend_url=f"http://127.0.0.1:{free_port()}")
    assert await backends.sync([local, a, b]) == {
        "added": ["a", "b"],
        "removed": [],
        "replaced": [],
    }
    await backends.start()
    engine_a = backends.get(a)
    assert backends.get(a) is engine_a
    await until(lambda: backends.up() == {"a": True, "b": False})
    status = backends.status()
    assert status["a"]["backend_url"] == upstream.url and status["a"]["breaker"] == "closed"
    assert status["b"]["last_error"] is not None

    moved = RemoteModelSpec(name="a", backend_url=f"{upstream.url}/")  # the schema strips the slash
    assert (await backends.sync([moved]))["removed"] == ["b"]
    assert backends.get(moved) is engine_a
    elsewhere = RemoteModelSpec(name="a", backend_url="http://127.0.0.1:1")
    assert (await backends.sync([elsewhere]))["replaced"] == ["a"]
    assert backends.get(elsewhere) is not engine_a
    c = RemoteModelSpec(name="c", backend_url=upstream.url)
    engine_c = backends.get(c)  # made on first use, health check started
    await until(lambda: backends.up().get("c") is True)
    reply = await engine_c.serve(
        RouteCall.of_endpoint(Endpoint.CHAT, {"model": "echo"}), incoming()
    )
    assert isinstance(reply, JSONReply) and reply.body == JSON_ANSWER
    await backends.close()
    assert backends.status() == {}


async def test_backend_model_is_asked_for_and_answered_under_the_entrys_name(
    upstream: Upstream,
) -> None:
    spec = RemoteModelSpec(name="llama", backend_url=upstream.url, backend_model="echo")
    async with httpx.AsyncClient() as client:
        engine = RemoteEngine(spec, client, FAST)
        reply = await engine.serve(
            RouteCall.of_endpoint(Endpoint.CHAT, {"model": "llama", "messages": []}), incoming()
        )
    assert isinstance(reply, JSONReply) and reply.status_code == 200
    assert upstream.seen.requests[-1][2]["model"] == "echo"
    assert reply.body == JSON_ANSWER.replace(b'"model":"echo"', b'"model":"llama"')
