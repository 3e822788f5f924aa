"""API keys: the middleware on a tiny app, the per-key limits, and loading the key config."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from appliance.api.auth import (
    ApiKey,
    AuthConfig,
    AuthMiddleware,
    PublicRoute,
    Role,
    check_model_allowed,
)
from appliance.api.auth_backoff import AuthBackoff, client_of
from appliance.api.auth_file import describe_open, load_auth_config
from appliance.api.error_handlers import register_error_handlers
from appliance.api.middleware import RequestContextMiddleware
from appliance.errors import ConfigError
from appliance.supervisor.lending_board import KeyLimits
from appliance.supervisor.sliding_window import SlidingWindow

USER_KEY = "sk-user-0123456789abcdef0123456789"
ADMIN_KEY = "sk-admin-0123456789abcdef0123456789"
LIMITED_KEY = "sk-limited-0123456789abcdef0123456789"
ALL_KEYS = (USER_KEY, ADMIN_KEY, LIMITED_KEY)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def default_keys() -> list[ApiKey]:
    return [
        ApiKey.model_validate({"key": USER_KEY, "name": "alice", "role": "user"}),
        ApiKey.model_validate({"key": ADMIN_KEY, "name": "ops", "role": "admin"}),
        ApiKey.model_validate(
            {
                "key": LIMITED_KEY,
                "name": "bob",
                "models": ["tiny"],
                "requests_per_minute": 2,
                "max_concurrent": 1,
            }
        ),
    ]


class Gate:
    """Lets a streaming endpoint be held open until the test releases it."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


def build_app(config: AuthConfig, clock: FakeClock, gate: Gate | None = None) -> FastAPI:
    app = FastAPI()
    register_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> str:
        return "appliance_up 1"

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, str]:
        body = await request.json()
        check_model_allowed(request.scope, body["model"])
        return {"model": body["model"]}

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            if gate is not None:
                gate.entered.set()
                await gate.release.wait()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/admin/models")
    async def admin_models() -> dict[str, list[str]]:
        return {"models": []}

    # Same order as the real app: the auth middleware sits inside the request context.
    app.add_middleware(AuthMiddleware, config=config, clock=clock)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=2**20)
    return app


Call = Callable[..., httpx.Response]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_call(clock: FakeClock) -> Iterator[Callable[[AuthConfig], Call]]:
    """Builds an app for a config; returns a sync ``call(method, path, key=None, **kw)``."""

    def make(config: AuthConfig) -> Call:
        app = build_app(config, clock)

        def call(method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
            async def go() -> httpx.Response:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    headers = {**(bearer(key) if key is not None else {})}
                    headers.update(kwargs.pop("headers", {}))
                    return await c.request(method, path, headers=headers, **kwargs)

            return asyncio.run(go())

        return call

    yield make


@pytest.fixture
def call(make_call: Callable[[AuthConfig], Call]) -> Call:
    return make_call(AuthConfig(keys=default_keys()))


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert "x-request-id" in response.headers
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    for key in ALL_KEYS:
        assert key not in response.text


# --- access -------------------------------------------------------------------------------


def test_no_keys_is_open(make_call: Callable[[AuthConfig], Call]) -> None:
    call = make_call(AuthConfig())
    assert call("GET", "/v1/models").status_code == 200
    assert call("GET", "/admin/models").status_code == 200
    assert call("GET", "/v1/models", key="anything-at-all").status_code == 200
    assert call("GET", "/nowhere").status_code == 404


def test_describe_open() -> None:
    warning = describe_open(AuthConfig())
    assert warning is not None and "open" in warning
    assert describe_open(AuthConfig(keys=default_keys())) is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {USER_KEY}"},
        {"Authorization": "Bearer sk-wrong-0123456789"},
        {"Authorization": f"Bearer {USER_KEY}x"},
        {"X-API-Key": USER_KEY},
    ],
    ids=["none", "empty", "basic", "wrong", "longer", "x-api-key"],
)
def test_missing_or_wrong_key_is_401(call: Call, headers: dict[str, str]) -> None:
    response = call("GET", "/v1/models", headers=headers)
    assert_error(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_right_key_passes(call: Call) -> None:
    assert call("GET", "/v1/models", key=USER_KEY).status_code == 200
    lower_scheme = call("GET", "/v1/models", headers={"Authorization": f"bearer {USER_KEY}"})
    assert lower_scheme.status_code == 200


def test_user_key_on_admin_is_403(call: Call) -> None:
    assert_error(call("GET", "/admin/models", key=USER_KEY), 403, "permission_denied")


def test_admin_key_reaches_admin_and_v1(call: Call) -> None:
    assert call("GET", "/admin/models", key=ADMIN_KEY).status_code == 200
    assert call("GET", "/v1/models", key=ADMIN_KEY).status_code == 200


def test_unknown_routes_need_a_key(call: Call) -> None:
    assert_error(call("GET", "/nowhere"), 401, "invalid_api_key")
    assert call("GET", "/nowhere", key=USER_KEY).status_code == 404


def test_public_routes_by_default(call: Call) -> None:
    # Issue 13: health is public; /metrics and the docs follow the keys like any route.
    for path in ("/health", "/ready"):
        assert call("GET", path).status_code == 200, path
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert_error(call("GET", path), 401, "invalid_api_key")
        assert call("GET", path, key=USER_KEY).status_code == 200, path


def test_public_routes_are_configurable(make_call: Callable[[AuthConfig], Call]) -> None:
    call = make_call(AuthConfig(keys=default_keys(), public={PublicRoute.HEALTH}))
    assert call("GET", "/health").status_code == 200
    assert_error(call("GET", "/metrics"), 401, "invalid_api_key")
    assert_error(call("GET", "/openapi.json"), 401, "invalid_api_key")
    assert call("GET", "/metrics", key=USER_KEY).status_code == 200

    closed = make_call(AuthConfig(keys=default_keys(), public=set()))
    assert_error(closed("GET", "/health"), 401, "invalid_api_key")


def test_disallowed_model_is_403(call: Call) -> None:
    ok = call("POST", "/v1/chat/completions", key=LIMITED_KEY, json={"model": "tiny"})
    assert ok.status_code == 200
    refused = call("POST", "/v1/chat/completions", key=LIMITED_KEY, json={"model": "big"})
    assert_error(refused, 403, "model_not_allowed")
    assert refused.json()["error"]["param"] == "model"
    # A key with no model list may use any model.
    anything = call("POST", "/v1/chat/completions", key=USER_KEY, json={"model": "big"})
    assert anything.status_code == 200


# --- limits -------------------------------------------------------------------------------


def test_requests_per_minute(call: Call, clock: FakeClock) -> None:
    assert call("GET", "/v1/models", key=LIMITED_KEY).status_code == 200
    clock.now += 10
    assert call("GET", "/v1/models", key=LIMITED_KEY).status_code == 200
    clock.now += 5
    refused = call("GET", "/v1/models", key=LIMITED_KEY)
    assert_error(refused, 429, "rate_limited")
    # The first request leaves the window 60 s after it was made: 45 s from now.
    assert refused.headers["retry-after"] == "45"
    # Other keys are not affected.
    assert call("GET", "/v1/models", key=USER_KEY).status_code == 200
    clock.now += 45
    assert call("GET", "/v1/models", key=LIMITED_KEY).status_code == 200
    assert call("GET", "/v1/models", key=LIMITED_KEY).status_code == 429


def test_refused_requests_do_not_count() -> None:
    clock = FakeClock()
    window = SlidingWindow(1, clock=clock)
    window.admit()
    for _ in range(5):
        assert window.retry_after() == 60
    clock.now += 60
    assert window.retry_after() is None


def test_rate_refusal_does_not_take_a_concurrency_slot() -> None:
    limits = KeyLimits(requests_per_minute=1, max_concurrent=1, clock=FakeClock())
    assert limits.try_acquire() is None
    limits.release()
    assert limits.try_acquire() is not None
    assert limits.in_flight == 0


def test_concurrency_held_until_stream_ends(clock: FakeClock) -> None:
    keys = [ApiKey.model_validate({"key": LIMITED_KEY, "name": "bob", "max_concurrent": 1})]

    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        gate = Gate()
        app = build_app(AuthConfig(keys=keys), clock, gate)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.get("/v1/stream", headers=bearer(LIMITED_KEY)))
            # The stream has sent its first chunk and is still open: its slot is taken.
            await asyncio.wait_for(gate.entered.wait(), 5)
            second = await client.get("/v1/models", headers=bearer(LIMITED_KEY))
            gate.release.set()
            done = await asyncio.wait_for(first, 5)
            third = await client.get("/v1/models", headers=bearer(LIMITED_KEY))
            return done, second, third

    first, second, third = asyncio.run(main())
    assert first.status_code == 200 and first.text.endswith("data: [DONE]\n\n")
    assert_error(second, 429, "rate_limited")
    assert second.headers["retry-after"] == "1"
    assert third.status_code == 200


async def _ignore(_: Any) -> None:
    return None


async def _empty_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def raw_status(app: Any, path: str, key: str) -> int:
    """Drive ``app`` with a hand-made scope (paths an HTTP client would rewrite)."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    asyncio.run(app(scope, _empty_body, send))
    return int(sent[0]["status"])


def test_doubled_slashes_do_not_dodge_the_admin_check(clock: FakeClock) -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AuthMiddleware(ok, config=AuthConfig(keys=default_keys()), clock=clock)
    assert raw_status(middleware, "//admin/models", USER_KEY) == 403
    assert raw_status(middleware, "//admin/models", ADMIN_KEY) == 200
    assert raw_status(middleware, "/v1//models", USER_KEY) == 200


def test_slot_released_when_app_raises(clock: FakeClock) -> None:
    keys = [ApiKey.model_validate({"key": LIMITED_KEY, "name": "bob", "max_concurrent": 1})]

    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    middleware = AuthMiddleware(boom, config=AuthConfig(keys=keys), clock=clock)
    # With max_concurrent 1, a leaked slot would turn the second try into a 429.
    for _ in range(3):
        with pytest.raises(RuntimeError):
            raw_status(middleware, "/v1/models", LIMITED_KEY)


# --- logs ---------------------------------------------------------------------------------


def test_key_name_in_access_log_and_key_text_never_logged(
    call: Call, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    call("GET", "/v1/models", key=USER_KEY)
    call("GET", "/admin/models", key=USER_KEY)
    call("GET", "/v1/models", key=USER_KEY[:-1])
    call("POST", "/v1/chat/completions", key=LIMITED_KEY, json={"model": "big"})
    for _ in range(3):
        call("GET", "/v1/models", key=LIMITED_KEY)
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{name: x, key: '{ADMIN_KEY}', colour: red}}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError):
        load_auth_config(path, {})
    access = [r for r in caplog.records if r.name == "appliance.access"]
    assert any(getattr(r, "key", None) == "alice" and r.status == 200 for r in access)
    assert any(getattr(r, "key", None) == "alice" and r.status == 403 for r in access)
    assert any(getattr(r, "key", None) == "bob" and r.status == 429 for r in access)
    assert any(r.name == "appliance.auth" and "chmod 600" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        for key in (*ALL_KEYS, USER_KEY[:-1]):
            assert key not in text


# --- config -------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_load_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
public: [health]
keys:
  - name: alice
    key: {USER_KEY}
    models: [tiny, small]
    requests_per_minute: 60
    max_concurrent: 4
  - name: ops
    key: {ADMIN_KEY}
    role: admin
""",
    )
    config = load_auth_config(path, {})
    assert config.public == {PublicRoute.HEALTH}
    assert [(k.name, k.role) for k in config.keys] == [("alice", Role.USER), ("ops", Role.ADMIN)]
    assert config.keys[0].models == ["tiny", "small"]
    assert config.keys[0].requests_per_minute == 60
    assert USER_KEY not in repr(config)


def test_load_env() -> None:
    env = {
        "APPLIANCE_API_KEYS": f" {USER_KEY} , {LIMITED_KEY},,",
        "APPLIANCE_ADMIN_KEYS": ADMIN_KEY,
    }
    config = load_auth_config(None, env)
    assert [(k.name, k.role, k.key.get_secret_value()) for k in config.keys] == [
        ("env-user-1", Role.USER, USER_KEY),
        ("env-user-2", Role.USER, LIMITED_KEY),
        ("env-admin-1", Role.ADMIN, ADMIN_KEY),
    ]
    assert config.public == {PublicRoute.HEALTH}
    assert load_auth_config(None, {}).keys == []


def test_load_file_and_env_together(tmp_path: Path) -> None:
    path = write(tmp_path, f"keys:\n  - {{name: alice, key: {USER_KEY}}}\n")
    config = load_auth_config(path, {"APPLIANCE_ADMIN_KEYS": ADMIN_KEY})
    assert [k.name for k in config.keys] == ["alice", "env-admin-1"]


def test_empty_file_is_no_keys(tmp_path: Path) -> None:
    assert load_auth_config(write(tmp_path, ""), {}).keys == []


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{"name": "alice", "key": "sk-shrt"}], "key 'alice': field 'key'"),
        ([{"name": "alice", "key": USER_KEY, "colour": "red"}], "key 'alice': unknown field"),
        ([{"name": "alice", "key": USER_KEY, "role": "root"}], "key 'alice': field 'role'"),
        ([{"name": "alice", "key": "sk-with space-123"}], "key 'alice': field 'key'"),
        ([{"name": "alice", "key": USER_KEY, "max_concurrent": 0}], "'max_concurrent'"),
        ([{"key": USER_KEY}], "key #1: field 'name' is required"),
        (
            [{"name": "alice", "key": USER_KEY}, {"name": "bob", "key": USER_KEY}],
            "key 'bob': field 'key': same key as 'alice'",
        ),
        (
            [{"name": "alice", "key": USER_KEY}, {"name": "alice", "key": ADMIN_KEY}],
            "key 'alice': the name is used by another key too",
        ),
        # A key pasted where the name goes must not come back in the message.
        ([{"name": f"{USER_KEY} ", "key": ADMIN_KEY}], "key #1: field 'name'"),
    ],
    ids=[
        "short",
        "unknown-field",
        "bad-role",
        "space",
        "zero-limit",
        "no-name",
        "dup-key",
        "dup-name",
        "key-as-name",
    ],
)
def test_config_errors_name_the_key_not_its_text(
    tmp_path: Path, entries: list[dict[str, Any]], expected: str
) -> None:
    path = write(tmp_path, yaml.safe_dump({"keys": entries}))
    with pytest.raises(ConfigError) as caught:
        load_auth_config(path, {})
    message = caught.value.message
    assert expected in message
    assert str(path) in message
    for entry in entries:
        assert str(entry["key"]).strip() not in message


def test_env_config_errors_name_the_env_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_auth_config(None, {"APPLIANCE_ADMIN_KEYS": f"{ADMIN_KEY},short"})
    assert "key 'env-admin-2': field 'key'" in caught.value.message
    assert "short" not in caught.value.message.replace("too_short", "")
    with pytest.raises(ConfigError) as caught:
        load_auth_config(None, {"APPLIANCE_API_KEYS": USER_KEY, "APPLIANCE_ADMIN_KEYS": USER_KEY})
    assert "key 'env-admin-1': field 'key': same key as 'env-user-1'" in caught.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"keys:\n  - name: a\n    key: [{USER_KEY}\n", "not valid YAML at line"),
        ("- just a list\n", "expected a mapping"),
        ("keys: {a: 1}\n", "'keys' must be a list"),
        ("public: [health, everything]\n", "top level: field 'public.1'"),
        ("users: []\n", "unknown field 'users'"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_auth_config(write(tmp_path, text), {})
    assert expected in caught.value.message
    assert USER_KEY not in caught.value.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_auth_config(tmp_path / "missing.yaml", {})


def test_a_guessable_key_is_one_clear_config_error(tmp_path: Path) -> None:
    # Twelve characters pass the schema (8) but not the keys file: 32 at least (128 bits).
    path = write(
        tmp_path, "keys:\n  - {name: alice, key: sk-12345678}\n  - {name: bob, key: sk-abcdefgh}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_auth_config(path, {})
    message = caught.value.message
    assert "key 'alice': field 'key'; key 'bob': field 'key': fewer than 32 characters" in message
    assert "\n" not in message and "sk-12345678" not in message
    with pytest.raises(ConfigError, match="key 'env-user-1': field 'key': fewer than 32"):
        load_auth_config(None, {"APPLIANCE_API_KEYS": "sk-12345678"})


def test_wrong_keys_slow_their_sender_and_no_one_else(clock: FakeClock) -> None:
    app = build_app(AuthConfig(keys=default_keys()), clock)

    def call(client: str, key: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app, client=(client, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.get("/v1/models", headers=bearer(key))

        return asyncio.run(go())

    guesser, other = "192.168.1.66", "192.168.1.7"
    for guess in range(5):  # a few typos are free
        assert_error(call(guesser, f"sk-guess-{guess:030d}"), 401, "invalid_api_key")
    assert_error(call(guesser, "sk-guess-5"), 401, "invalid_api_key")
    # Now the guesser waits, and its keys are not even looked at, right or wrong.
    for key in ("sk-guess-6", USER_KEY):
        waiting = call(guesser, key)
        assert_error(waiting, 429, "rate_limited")
        assert waiting.headers["retry-after"] == "1"
    # Everyone else is served, wrong keys of theirs judged as usual.
    assert call(other, USER_KEY).status_code == 200
    assert_error(call(other, "sk-typo"), 401, "invalid_api_key")
    # The wait doubles with each further failure, up to a ceiling.
    clock.now += 1.5
    assert_error(call(guesser, "sk-guess-7"), 401, "invalid_api_key")
    assert call(guesser, USER_KEY).headers["retry-after"] == "2"
    for _ in range(10):
        clock.now += 70
        call(guesser, "sk-guess-again")
    assert int(call(guesser, USER_KEY).headers["retry-after"]) <= 60
    # After the wait, the right key is served and the record goes.
    clock.now += 61
    assert call(guesser, USER_KEY).status_code == 200
    assert_error(call(guesser, "sk-typo"), 401, "invalid_api_key")


def test_the_backoff_records_are_bounded() -> None:
    backoff = AuthBackoff(free_failures=0, max_delay_seconds=60, clock=lambda: 0.0, max_clients=3)
    for n in range(10):
        backoff.failed(f"10.0.0.{n}")
    assert backoff.wait("10.0.0.9") == 1.0 and backoff.wait("10.0.0.0") is None
    # One host's IPv6 addresses are one client.
    assert client_of(ipaddress.ip_address("2001:db8::1")) == client_of(
        ipaddress.ip_address("2001:db8::ffff:1")
    )
