"""The registry service: a read token when configured, and no secrets stored or served."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from appliance.errors import ConfigError
from appliance.registry.service import create_registry_app
from appliance.registry.settings import RegistrySettings, resolve_read_token

WRITE = "w" * 40
READ = "r" * 40
MODELS = "/v1/registry/models"


def client(tmp_path: Path, read_token: str | None) -> TestClient:
    settings = RegistrySettings(
        db_path=tmp_path / "registry.db",
        token=SecretStr(WRITE),
        read_token=SecretStr(read_token) if read_token else None,
        allowed_hosts=["testserver"],
    )
    return TestClient(create_registry_app(settings), raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_reads_need_the_read_token_when_one_is_set(tmp_path: Path) -> None:
    with client(tmp_path, READ) as http:
        entry = {"name": "m", "backend_url": "http://box-a:8000"}
        assert http.put(f"{MODELS}/m", json=entry, headers=bearer(WRITE)).status_code == 201
        for path in (MODELS, f"{MODELS}/m"):
            assert http.get(path).status_code == 401
            assert http.get(path, headers=bearer("r" * 39)).status_code == 401
            assert http.get(path, headers=bearer(READ)).status_code == 200
            assert http.get(path, headers=bearer(WRITE)).status_code == 200
        assert http.get("/health").status_code == 200
        # The read token does not write.
        assert http.put(f"{MODELS}/m", json=entry, headers=bearer(READ)).status_code == 401


def test_reads_stay_open_without_a_read_token(tmp_path: Path) -> None:
    with client(tmp_path, None) as http:
        assert http.get(MODELS).status_code == 200


@pytest.mark.parametrize("setting", ["hf_token", "api_key", "aws_secret_access", "password"])
def test_secrets_are_not_stored(tmp_path: Path, setting: str) -> None:
    entry = {"name": "m", "source": "org/m", "engine": {setting: "hunter2"}}
    with client(tmp_path, None) as http:
        response = http.put(f"{MODELS}/m", json=entry, headers=bearer(WRITE))
        assert response.status_code == 422 and "hunter2" not in response.text
        assert http.get(MODELS).json()["data"] == []
        fine = {**entry, "engine": {"tokenizer_mode": "auto", "max_num_batched_tokens": 512}}
        assert http.put(f"{MODELS}/m", json=fine, headers=bearer(WRITE)).status_code == 201


def test_read_token_sources(tmp_path: Path) -> None:
    file = tmp_path / "read-token"
    file.write_text(READ + "\n")
    assert resolve_read_token(file, {}).get_secret_value() == READ  # type: ignore[union-attr]
    env = {"APPLIANCE_REGISTRY_READ_TOKEN": READ}
    assert resolve_read_token(None, env).get_secret_value() == READ  # type: ignore[union-attr]
    assert resolve_read_token(None, {}) is None
    file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_read_token(file, {})


def fetch_with(handler: object, **options: object) -> list[object]:
    """``RegistryClient.fetch`` against an httpx mock transport running ``handler``."""
    import asyncio

    import httpx

    from appliance.catalogue.registry_client import RegistryClient

    async def go() -> list[object]:
        transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport) as http:
            registry = RegistryClient("https://registry:8100", client=http, **options)  # type: ignore[arg-type]
            return list(await registry.fetch())

    return asyncio.run(go())


def test_the_client_sends_its_read_token_and_caps_the_answer() -> None:
    import httpx

    from appliance.catalogue.registry_client import RegistryBadAnswerError

    seen: list[str | None] = []
    entries = [{"name": f"m{i}", "spec": {"name": f"m{i}", "source": "org/m"}} for i in range(3)]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"object": "list", "data": entries})

    assert len(fetch_with(answer, token=SecretStr(READ))) == 3
    assert seen == [f"Bearer {READ}"]
    with pytest.raises(RegistryBadAnswerError, match="over the limit of 2"):
        fetch_with(answer, max_entries=2)
    with pytest.raises(RegistryBadAnswerError, match="more than 100 bytes"):
        fetch_with(answer, max_bytes=100)


def test_tokens_are_at_least_32_characters(tmp_path: Path) -> None:
    from pydantic import ValidationError

    for field in ("token", "read_token"):
        with pytest.raises(ValidationError, match="at least 32") as caught:
            RegistrySettings(db_path=tmp_path / "r.db", **{field: SecretStr("x" * 31)})
        assert "x" * 31 not in str(caught.value)


def test_the_write_token_is_not_taken_on_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from appliance.cli.registry_cmd import registry_app

    result = CliRunner().invoke(registry_app, ["serve", "--token", "t" * 40])
    assert result.exit_code != 0 and "No such option" in result.output
    short = tmp_path / "short"
    short.write_text("t" * 10)
    result = CliRunner().invoke(
        registry_app, ["serve", "--db", str(tmp_path / "r.db"), "--token-file", str(short)]
    )
    assert result.exit_code != 0 and "at least 32" in result.output
