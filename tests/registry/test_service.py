"""The registry service's HTTP API: CRUD, validation, auth, error envelope, persistence.

Most cases go through FastAPI's in-process test client; the last ones start the real service
with the CLI, over real HTTP, and restart it on the same database.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from appliance.errors import ConfigError
from appliance.registry.service import MAX_BODY_BYTES, create_registry_app
from appliance.registry.settings import TOKEN_ENV_VAR, RegistrySettings, resolve_token

TOKEN = "s3cret-token-of-at-least-32-characters"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = "/v1/registry/models"


def entry(name: str = "org/tiny:1", **fields: Any) -> dict[str, Any]:
    """A valid catalogue entry as JSON; ``fields`` override or add."""
    return {"name": name, "backend_url": "http://other:8000", **fields}


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an OpenAI error envelope with this status and code; returns the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: a test client on a fresh app over ``tmp_path/registry.db``."""
    clients: list[TestClient] = []

    def make(token: str | None = TOKEN) -> TestClient:
        settings = RegistrySettings(
            db_path=tmp_path / "registry.db",
            token=SecretStr(token) if token is not None else None,
            allowed_hosts=["testserver"],
        )
        client = TestClient(create_registry_app(settings), raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": 0}


def test_crud_round_trip(client: TestClient) -> None:
    name = "org/tiny:1"  # slashes and colons travel in the path
    created = client.post(MODELS, json=entry(name), headers=AUTH)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["object"] == "registry.model"
    assert body["name"] == name
    assert body["spec"]["backend_url"] == "http://other:8000"
    assert body["spec"]["version"] == "1"  # defaults filled in by ModelSpec
    assert body["created_at"] == body["updated_at"]

    got = client.get(f"{MODELS}/{name}")
    assert got.status_code == 200
    assert got.json() == body

    replaced = client.put(f"{MODELS}/{name}", json=entry(name, version="2"), headers=AUTH)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["spec"]["version"] == "2"
    assert replaced.json()["created_at"] == body["created_at"]

    new = client.put(f"{MODELS}/plain", json=entry("plain"), headers=AUTH)
    assert new.status_code == 201, new.text

    listed = client.get(MODELS)
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"
    assert [e["name"] for e in listed.json()["data"]] == [name, "plain"]

    deleted = client.delete(f"{MODELS}/{name}", headers=AUTH)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_envelope(client.get(f"{MODELS}/{name}"), 404, "model_not_found")
    assert_envelope(client.delete(f"{MODELS}/{name}", headers=AUTH), 404, "model_not_found")


def test_create_existing_is_409(client: TestClient) -> None:
    assert client.post(MODELS, json=entry("m"), headers=AUTH).status_code == 201
    error = assert_envelope(client.post(MODELS, json=entry("m"), headers=AUTH), 409, "model_exists")
    assert error["param"] == "name"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (entry("m", colour="blue"), "colour"),  # unknown key
        (
            {"name": "m", "source": "org/m", "resources": {"tensor_parallel_size": 0}},
            "resources.tensor_parallel_size",
        ),
        (entry("m", autoload=True), "autoload"),  # a local model's field on a remote entry
        (entry("bad name!"), "name"),
        ({"name": "m"}, None),  # neither source nor backend_url
        (entry("m", source="/models/m"), None),  # both
        ({"backend_url": "http://x"}, "name"),
        ([entry("m")], None),  # a list, not an object
    ],
)
def test_invalid_entries_are_422(client: TestClient, body: Any, param: str | None) -> None:
    error = assert_envelope(client.post(MODELS, json=body, headers=AUTH), 422, "invalid_model_spec")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert client.get(MODELS).json()["data"] == []


@pytest.mark.parametrize("content", [b"{not json", b"", b"  ", b'{"name": "m",}'])
def test_malformed_json_is_400(client: TestClient, content: bytes) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    for response in (
        client.post(MODELS, content=content, headers=headers),
        client.put(f"{MODELS}/m", content=content, headers=headers),
    ):
        assert_envelope(response, 400, "invalid_json")


def test_body_too_large_is_413(client: TestClient) -> None:
    huge = entry("m", owner="x" * (MAX_BODY_BYTES + 1))
    assert_envelope(client.post(MODELS, json=huge, headers=AUTH), 413, "body_too_large")


def test_put_name_must_match_path(client: TestClient) -> None:
    error = assert_envelope(
        client.put(f"{MODELS}/a", json=entry("b"), headers=AUTH), 400, "name_mismatch"
    )
    assert error["param"] == "name"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_writes_need_the_token(client: TestClient, headers: dict[str, str]) -> None:
    client.put(f"{MODELS}/m", json=entry("m"), headers=AUTH)
    for response in (
        client.post(MODELS, json=entry("n"), headers=headers),
        client.put(f"{MODELS}/m", json=entry("m", version="9"), headers=headers),
        client.delete(f"{MODELS}/m", headers=headers),
        # Auth is checked before the body is read: no probing the validator without a token.
        client.post(
            MODELS, content=b"{garbage", headers={**headers, "content-type": "application/json"}
        ),
    ):
        error = assert_envelope(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert [e["spec"]["version"] for e in client.get(MODELS).json()["data"]] == ["1"]


def test_bearer_scheme_is_case_insensitive(client: TestClient) -> None:
    response = client.post(MODELS, json=entry("m"), headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 201


def test_reads_need_no_token(client: TestClient) -> None:
    client.post(MODELS, json=entry("m"), headers=AUTH)
    assert client.get(MODELS).status_code == 200
    assert client.get(f"{MODELS}/m").status_code == 200


def test_generated_token_is_kept_in_a_file_never_logged_and_works(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Issue 13: the token is never logged; its file (mode 0600) is.
    with caplog.at_level(logging.DEBUG):
        client = make_client(token=None)
    path = tmp_path / "registry.db.token"
    token = path.read_text().strip()
    assert len(token) >= 32 and path.stat().st_mode & 0o077 == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "appliance.registry"]
    assert len(logged) == 1 and str(path) in logged[0]
    assert all(token not in r.getMessage() for r in caplog.records)
    assert make_client(token=None) is not None and path.read_text().strip() == token  # kept
    assert client.post(MODELS, json=entry("m")).status_code == 401
    ok = client.post(MODELS, json=entry("m"), headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 201


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nowhere"), 404, "not_found")
    assert_envelope(client.patch(f"{MODELS}/m", json={}, headers=AUTH), 405, "method_not_allowed")


def test_a_new_app_on_the_same_database_sees_the_entries(
    make_client: Callable[..., TestClient],
) -> None:
    make_client().post(MODELS, json=entry("org/kept:1"), headers=AUTH)
    again = make_client()
    assert [e["name"] for e in again.get(MODELS).json()["data"]] == ["org/kept:1"]


def test_resolve_token_sources(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    env = {TOKEN_ENV_VAR: "from-env"}

    def value(token: str | None, token_file: Path | None, environ: dict[str, str]) -> str | None:
        resolved = resolve_token(token, token_file, environ)
        return None if resolved is None else resolved.get_secret_value()

    assert value("cli", None, env) == "cli"
    assert value(None, file, env) == "from-file"
    assert value(None, None, env) == "from-env"
    assert value(None, None, {}) is None
    with pytest.raises(ConfigError, match="not both"):
        resolve_token("cli", file, {})
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_token(None, tmp_path / "missing", {})
    file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_token(None, file, {})


# --- the real service, started by the CLI --------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(db: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``appliance registry serve`` in a child process, once its /health answers."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from appliance.cli.registry_cmd import registry_app; registry_app()",
            "serve",
            "--db",
            str(db),
            "--port",
            str(port),
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"registry exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_service(process)
    raise AssertionError("registry did not answer /health within 30s")


def stop_service(process: subprocess.Popen[bytes]) -> None:
    """Interrupt the service and wait for it to exit."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout:
        process.stdout.close()


def test_real_service_keeps_entries_across_a_restart(tmp_path: Path) -> None:
    db, port = tmp_path / "registry.db", free_port()
    url = f"http://127.0.0.1:{port}{MODELS}"
    env = {TOKEN_ENV_VAR: TOKEN}

    process = start_service(db, port, env)
    try:
        created = httpx.put(f"{url}/org/kept:1", json=entry("org/kept:1"), headers=AUTH)
        assert created.status_code == 201, created.text
        assert_envelope(httpx.post(url, json=entry("x")), 401, "invalid_api_key")
        assert_envelope(
            httpx.post(url, content=b"{", headers={**AUTH, "Content-Type": "application/json"}),
            400,
            "invalid_json",
        )
    finally:
        stop_service(process)

    process = start_service(db, port, env)
    try:
        listed = httpx.get(url)
        assert [e["name"] for e in listed.json()["data"]] == ["org/kept:1"]
        assert httpx.get(f"{url}/org/kept:1").json()["spec"]["backend_url"] == "http://other:8000"
    finally:
        stop_service(process)


def test_a_rebinding_page_reads_nothing(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert client.put(f"{MODELS}/m", json=entry("m"), headers=AUTH).status_code in (200, 201)
    # A page on attacker.example whose name now resolves to the registry's address.
    for path in (MODELS, f"{MODELS}/m", "/health"):
        refused = client.get(path, headers={"Host": "attacker.example:8100"})
        assert_envelope(refused, 400, "host_not_allowed")
    # Its own names still read it.
    assert client.get(MODELS).json()["data"][0]["name"] == "m"
