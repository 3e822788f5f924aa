"""The registry client and poller against a real registry service on a real port.

The registry runs as a uvicorn server inside the test's event loop, so a test can stop it and
start it again on the same port. Bad answers come from a small ASGI app whose answer each test
sets. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from appliance.catalogue.registry_client import (
    CatalogueSource,
    RegistryBadAnswerError,
    RegistryClient,
    RegistryPoller,
    RegistryUnavailableError,
)
from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.registry.service import create_registry_app
from appliance.registry.settings import RegistrySettings

pytestmark = pytest.mark.anyio

TOKEN = "t0ken-of-at-least-32-characters-long"
TTL = 0.05  # seconds between polls: short, so state changes show within a few polls
FALLBACK = [LocalModelSpec(name="from-yaml", source="/models/tiny")]

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Server:
    """An ASGI app on a real port in this event loop; stop and start keep the port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.port = 0  # the OS picks one on the first start
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        self._server, self._task = server, task
        await wait_until(lambda: server.started or task.done(), "the server to start")
        if task.done():
            task.result()  # raises the start error, if any
            raise AssertionError("the server exited at start")
        self.port = server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)
        self._server = self._task = None


class Answer:
    """A fake registry whose answer to the list route the test sets; counts requests."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b'{"object": "list", "data": []}'
        self.delay = 0.0
        self.requests = 0

    def json(self, value: Any) -> None:
        self.status, self.body = 200, json.dumps(value).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def wire(*specs: dict[str, Any]) -> dict[str, Any]:
    """A list answer as the registry service shapes it."""
    data = [
        {
            "object": "registry.model",
            "name": s["name"],
            "created_at": "2025-01-01T00:00:00+00:00",
            "updated_at": "2025-01-01T00:00:00+00:00",
            "spec": s,
        }
        for s in specs
    ]
    return {"object": "list", "data": data}


def remote(name: str, **fields: Any) -> dict[str, Any]:
    """A valid remote entry as JSON."""
    return {"name": name, "backend_url": "http://other:8000", **fields}


class Changes:
    """Records every ``on_change`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[ModelSpec], CatalogueSource]] = []

    async def __call__(self, specs: list[ModelSpec], source: CatalogueSource) -> None:
        self.calls.append((specs, source))

    @property
    def last(self) -> tuple[list[str], CatalogueSource]:
        specs, source = self.calls[-1]
        return [s.name for s in specs], source


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Server]:
    """The real registry service, running, over a fresh database."""
    settings = RegistrySettings(db_path=tmp_path / "registry.db", token=SecretStr(TOKEN))
    server = Server(create_registry_app(settings))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Server, Answer]]:
    """A fake registry answering whatever the test sets."""
    answer = Answer()
    server = Server(answer)
    await server.start()
    yield server, answer
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def put(http: httpx.AsyncClient, registry: Server, body: dict[str, Any]) -> None:
    """Store an entry in the registry through its API."""
    response = await http.put(
        f"{registry.url}/v1/registry/models/{body['name']}",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code in (200, 201), response.text


def unused_url() -> str:
    """A URL on which nothing listens: a port the OS gave out and took back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- RegistryClient.fetch ------------------------------------------------------------------


async def test_fetch_returns_the_registry_entries(
    registry: Server, http: httpx.AsyncClient
) -> None:
    await put(http, registry, remote("org/b:1", version="3"))
    await put(http, registry, {"name": "a", "source": "/models/a", "task": "embed"})
    async with RegistryClient(registry.url + "/", timeout=5) as client:
        specs = await client.fetch()
    assert [s.name for s in specs] == ["a", "org/b:1"]
    assert specs[0].task.value == "embed" and specs[0].source == "/models/a"
    assert specs[1].version == "3" and specs[1].backend_url == "http://other:8000"


async def test_fetch_uses_a_given_http_client_without_closing_it(
    registry: Server, http: httpx.AsyncClient
) -> None:
    client = RegistryClient(registry.url, timeout=5, client=http)
    assert await client.fetch() == []
    await client.aclose()
    assert not http.is_closed


async def test_fetch_from_nothing_listening_is_unavailable() -> None:
    async with RegistryClient(unused_url(), timeout=5) as client:
        with pytest.raises(RegistryUnavailableError, match="cannot reach") as info:
            await client.fetch()
    assert not isinstance(info.value, RegistryBadAnswerError)


async def test_fetch_that_times_out_is_unavailable(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    answer.delay = 1.0
    async with RegistryClient(server.url, timeout=0.2) as client:
        with pytest.raises(RegistryUnavailableError, match=r"did not answer within 0\.2s"):
            await client.fetch()


async def test_fetch_non_200_is_unavailable(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    answer.json(wire(remote("m")))
    answer.status = 500
    async with RegistryClient(server.url, timeout=5) as client:
        with pytest.raises(RegistryUnavailableError, match="HTTP 500"):
            await client.fetch()


GARBAGE: list[Any] = [
    b"<html>not json</html>",
    b"",
    b'{"object": "list", "data": [',
    {"data": []},  # no object
    {"object": "list"},  # no data
    {"object": "model", "data": []},
    {"object": "list", "data": {"m": {}}},
    wire(remote("m", colour="blue")),  # unknown key in a spec
    wire(remote("m"), {"name": "n"}),  # one good entry, one bad: the whole answer is refused
    wire(remote("m"), remote("m")),  # a name twice
    {"object": "list", "data": [{"name": "m", "spec": remote("other")}]},  # name mismatch
    [remote("m")],
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_fetch_of_garbage_is_a_bad_answer(fake: tuple[Server, Answer], garbage: Any) -> None:
    server, answer = fake
    if isinstance(garbage, bytes):
        answer.body = garbage
    else:
        answer.json(garbage)
    async with RegistryClient(server.url, timeout=5) as client:
        with pytest.raises(RegistryBadAnswerError):
            await client.fetch()


# --- RegistryPoller ------------------------------------------------------------------------


async def test_constructor_starts_nothing(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    changes = Changes()
    async with RegistryClient(server.url, timeout=5) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=changes)
        await asyncio.sleep(3 * TTL)  # would be long enough for a started poller to ask
        assert answer.requests == 0 and changes.calls == []
        assert poller.source is CatalogueSource.FILE and poller.specs == FALLBACK
        assert poller.status().up is False


async def test_never_reachable_serves_the_file(caplog: pytest.LogCaptureFixture) -> None:
    changes = Changes()
    url = unused_url()
    async with RegistryClient(url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=changes)
        with caplog.at_level(logging.DEBUG, logger="appliance.registry"):
            await poller.start()
            try:
                assert changes.last == (["from-yaml"], CatalogueSource.FILE)
                first_error_at = poller.status().last_error_at
                await wait_until(
                    lambda: poller.status().last_error_at != first_error_at, "another poll"
                )
            finally:
                await poller.stop()
    assert len(changes.calls) == 1  # nothing changed after the first delivery
    status = poller.status()
    assert status.url == url and status.up is False and status.source is CatalogueSource.FILE
    assert status.models == 1 and status.last_success_at is None
    assert status.last_error and "cannot reach" in status.last_error
    downs = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(downs) == 1 and "models.yaml" in downs[0].getMessage()


async def test_registry_down_then_up_again(
    registry: Server, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await put(http, registry, remote("m1"))
    changes = Changes()
    async with RegistryClient(registry.url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=changes)
        with caplog.at_level(logging.INFO, logger="appliance.registry"):
            await poller.start()
            try:
                # Up: the registry's catalogue, delivered before start() returns.
                assert changes.last == (["m1"], CatalogueSource.REGISTRY)
                assert poller.status().up is True

                # A change in the registry reaches the poller within a few TTLs.
                await put(http, registry, remote("m2"))
                await wait_until(lambda: changes.last[0] == ["m1", "m2"], "the new entry")

                # Down: the last good catalogue stays, marked as cached.
                await registry.stop()
                await wait_until(lambda: poller.source is CatalogueSource.REGISTRY_CACHE, "cache")
                assert changes.last == (["m1", "m2"], CatalogueSource.REGISTRY_CACHE)
                assert poller.status().up is False and poller.status().last_error
                calls_while_down = len(changes.calls)
                errors_at = poller.status().last_error_at
                await wait_until(lambda: poller.status().last_error_at != errors_at, "a poll")
                assert len(changes.calls) == calls_while_down

                # Back on the same port, with the same database: the registry again.
                await registry.start()
                await wait_until(lambda: poller.source is CatalogueSource.REGISTRY, "registry")
                assert changes.last == (["m1", "m2"], CatalogueSource.REGISTRY)
                assert poller.status().up is True and poller.status().last_success_at
            finally:
                await poller.stop()
    sources = [source for _, source in changes.calls]
    assert sources == [
        CatalogueSource.REGISTRY,
        CatalogueSource.REGISTRY,
        CatalogueSource.REGISTRY_CACHE,
        CatalogueSource.REGISTRY,
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("registry is down" in m for m in messages) == 1
    assert sum(" is up " in m for m in messages) == 2
    assert sum("catalogue source" in m for m in messages) == 3  # file->registry->cache->registry


async def test_garbage_keeps_the_last_good_catalogue(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    answer.json(wire(remote("good")))
    changes = Changes()
    async with RegistryClient(server.url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=changes)
        await poller.start()
        try:
            assert changes.last == (["good"], CatalogueSource.REGISTRY)

            answer.json(wire(remote("bad", colour="blue")))
            await wait_until(lambda: poller.source is CatalogueSource.REGISTRY_CACHE, "cache")
            assert changes.last == (["good"], CatalogueSource.REGISTRY_CACHE)
            assert "invalid catalogue" in (poller.status().last_error or "")

            answer.json(wire(remote("good"), remote("better")))
            await wait_until(lambda: poller.source is CatalogueSource.REGISTRY, "registry")
            assert changes.last == (["good", "better"], CatalogueSource.REGISTRY)
        finally:
            await poller.stop()


async def test_garbage_from_the_start_serves_the_file(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    answer.body = b"not json"
    changes = Changes()
    async with RegistryClient(server.url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=changes)
        status = await poller.refresh()
    assert status.source is CatalogueSource.FILE and status.up is False
    assert changes.last == (["from-yaml"], CatalogueSource.FILE)


async def test_a_failing_handler_does_not_stop_the_poller(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    answer.json(wire(remote("a")))
    seen: list[list[str]] = []

    async def on_change(specs: list[ModelSpec], source: CatalogueSource) -> None:
        seen.append([s.name for s in specs])
        raise RuntimeError("consumer bug")

    async with RegistryClient(server.url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=on_change)
        await poller.start()
        try:
            answer.json(wire(remote("a"), remote("b")))
            await wait_until(lambda: seen[-1] == ["a", "b"], "the second catalogue")
        finally:
            await poller.stop()
    assert seen == [["a"], ["a", "b"]]


async def test_stop_ends_polling(fake: tuple[Server, Answer]) -> None:
    server, answer = fake
    async with RegistryClient(server.url, timeout=1) as client:
        poller = RegistryPoller(client, ttl=TTL, fallback=FALLBACK, on_change=Changes())
        await poller.start()
        await wait_until(lambda: answer.requests >= 3, "a few polls")
        await poller.stop()
        await poller.stop()  # a second stop is harmless
        after_stop = answer.requests
        await asyncio.sleep(5 * TTL)  # five polls' worth of time: none may come
        assert answer.requests == after_stop
        await poller.start()
        with pytest.raises(RuntimeError, match="already running"):
            await poller.start()
        await poller.stop()


async def test_stop_always_ends_even_mid_fetch(fake: tuple[Server, Answer]) -> None:
    # Stops land at random points of a poll, including as a fetch completes: the moment
    # asyncio.wait_for (Python < 3.12) swallowed the cancellation and stop() hung for ever.
    server, _ = fake
    rng = random.Random(4)
    async with RegistryClient(server.url, timeout=5) as client:
        for attempt in range(200):
            poller = RegistryPoller(client, ttl=0.0005, fallback=[], on_change=Changes())
            await poller.start()
            await asyncio.sleep(rng.random() * 0.005)
            stopping = asyncio.ensure_future(poller.stop())
            done, _ = await asyncio.wait({stopping}, timeout=5)
            assert done, f"stop() hung on attempt {attempt}"


async def test_a_local_field_on_a_remote_entry_is_refused_naming_it(
    fake: tuple[Server, Answer],
) -> None:
    server, answer = fake
    answer.json(wire(remote("far", autoload=True)))
    async with RegistryClient(server.url, timeout=1) as client:
        with pytest.raises(RegistryBadAnswerError) as caught:
            await client.fetch()
    assert "data.0.spec.autoload: does not apply to a remote backend" in caught.value.message
