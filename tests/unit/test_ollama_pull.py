"""Issue 28: Ollama's /api/pull and /api/delete in the whole HTTP app (real factory, auth,
supervisor, hub pull) against the local hub mirror: Ollama's status lines, stream or not,
admins only, and the refusals of the appliance's pull and rm in Ollama's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from huggingface_hub import constants

from appliance.api.app import create_app
from appliance.api.ollama_manage import ollama_pull_status
from appliance.api_keys import ApiKey
from appliance.host.inventory import cpu_inventory
from tests.hub_mirror import HubMirror, MirroredRepo
from tests.unit.fast_app import fast_settings
from tests.unit.test_app_fast import EchoMaker

ADMIN = {"Authorization": "Bearer sk-ops-0123456789"}
USER = {"Authorization": "Bearer sk-user-0123456789"}
REPO = "test-org/tiny"
LOADED = "test-org/loaded"
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS}


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubMirror]:
    """Two open repositories, and a fresh hub cache pointed at the mirror (as in hub/)."""
    repos = {
        REPO: MirroredRepo(files=dict(FILES), commit="a" * 40),
        LOADED: MirroredRepo(files=dict(FILES), commit="b" * 40),
    }
    with HubMirror(repos) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.fixture
def client(tmp_path: Path, mirror: HubMirror) -> Iterator[TestClient]:
    """``tiny`` (a hub entry, not loaded), ``loaded`` (a hub entry, loaded), ``folder`` (a
    local folder); an admin key and a user key."""
    folder = tmp_path / "weights"
    folder.mkdir()
    res = {"resources": {"memory_gib": 1}}
    models = [
        {"name": "tiny", "source": REPO, "autoload": False, **res},
        {"name": "loaded", "source": LOADED, **res},
        {"name": "folder", "source": str(folder), "autoload": False, **res},
    ]
    keys = [
        ApiKey.model_validate({"name": "ops", "key": ADMIN["Authorization"][7:], "role": "admin"}),
        ApiKey.model_validate({"name": "user", "key": USER["Authorization"][7:]}),
    ]
    settings = fast_settings(tmp_path, models, keys, disk_reserve_gib=0)
    app = create_app(settings, engines=EchoMaker(), inventory=cpu_inventory(4))
    with TestClient(app) as test_client:
        supervisor = app.state.appliance.supervisor
        test_client.portal.call(supervisor.wait_autoload)  # type: ignore[union-attr]
        yield test_client


def cached(repo: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"


def pull_lines(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", "/api/pull", json=body, headers=ADMIN) as stream:
        assert stream.status_code == 200, stream.read()
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in stream.iter_lines() if line]


def delete(client: TestClient, model: str, headers: dict[str, str] = ADMIN) -> Any:
    return client.request("DELETE", "/api/delete", json={"model": model}, headers=headers)


def test_a_pull_streams_ollamas_status_lines(client: TestClient, mirror: HubMirror) -> None:
    lines = pull_lines(client, {"model": "tiny:latest"})
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    done = {
        line["digest"]: line for line in lines[1:-1] if line.get("completed") == line.get("total")
    }
    assert set(done) == set(FILES)
    assert done["model.safetensors"] == {
        "status": "pulling model.safetensors",
        "digest": "model.safetensors",
        "total": len(WEIGHTS),
        "completed": len(WEIGHTS),
    }
    weights = next(cached(REPO).glob("snapshots/*/model.safetensors"))
    assert weights.read_bytes() == WEIGHTS
    # Whole, not streamed: the last line alone; nothing is fetched twice.
    before = len(mirror.gets(REPO, "model.safetensors"))
    whole = client.post("/api/pull", json={"model": REPO, "stream": False}, headers=ADMIN)
    assert whole.status_code == 200 and whole.json() == {"status": "success"}
    assert len(mirror.gets(REPO, "model.safetensors")) == before


def test_a_hub_id_outside_the_catalogue_is_pulled_too(client: TestClient) -> None:
    assert pull_lines(client, {"name": LOADED})[-1] == {"status": "success"}  # older field
    assert cached(LOADED).is_dir()


def test_delete_frees_the_files_then_answers_404(client: TestClient) -> None:
    pull_lines(client, {"model": "tiny"})
    gone = delete(client, "tiny")
    assert gone.status_code == 200 and gone.content == b""
    assert not cached(REPO).exists()
    again = delete(client, "tiny")
    assert again.status_code == 404 and "tiny" in again.json()["error"]
    # The catalogue is untouched: the entry is still there to pull again.
    assert "tiny" in {m["name"] for m in client.get("/api/tags", headers=ADMIN).json()["models"]}


def test_refusals_are_ollama_shaped_4xx(client: TestClient) -> None:
    local = client.post("/api/pull", json={"model": "folder"}, headers=ADMIN)
    assert local.status_code == 400 and "nothing to pull" in local.json()["error"]
    kept = delete(client, "folder")
    assert kept.status_code == 400 and "never deleted" in kept.json()["error"]
    pull_lines(client, {"model": "loaded"})
    busy = delete(client, "loaded")
    assert busy.status_code == 409 and "unload it first" in busy.json()["error"]
    assert cached(LOADED).is_dir()
    assert delete(client, "no-such-model").status_code == 404
    for body in ({}, {"model": ""}, {"model": 5}, {"model": "tiny", "stream": "yes"}):
        bad = client.post("/api/pull", json=body, headers=ADMIN)
        assert bad.status_code == 400 and isinstance(bad.json()["error"], str), body
    assert client.post("/api/pull", json={"model": "/etc"}, headers=ADMIN).status_code == 400


def test_only_admins_pull_or_delete(client: TestClient) -> None:
    assert client.post("/api/pull", json={"model": "tiny"}, headers=USER).status_code == 403
    assert delete(client, "tiny", USER).status_code == 403
    assert client.post("/api/pull", json={"model": "tiny"}).status_code == 401
    assert not cached(REPO).exists()
    # Others are still served.
    assert client.get("/api/tags", headers=USER).status_code == 200


def test_each_hub_pull_event_maps_to_ollamas_line() -> None:
    assert ollama_pull_status({"event": "plan", "files": []}) == {"status": "pulling manifest"}
    assert ollama_pull_status({"event": "progress", "file": "a", "done": 5, "total": 9}) == {
        "status": "pulling a",
        "digest": "a",
        "total": 9,
        "completed": 5,
    }
    assert ollama_pull_status({"event": "file_done", "file": "a", "total": 9})["completed"] == 9
    assert ollama_pull_status({"event": "done", "folder": "/x"}) == {"status": "success"}
    assert ollama_pull_status({"event": "error", "message": "gone"}) == {"error": "gone"}
    assert ollama_pull_status({"event": "other"}) is None
