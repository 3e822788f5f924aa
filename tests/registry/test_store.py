"""The registry's SQLite store: CRUD, errors, persistence, concurrent writers."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.catalogue.schema import ModelSpec, RemoteModelSpec, parse_model_spec
from appliance.errors import ModelNotFoundError
from appliance.registry.store import ModelExistsError, RegistryStore


def spec(name: str = "org/tiny:1", **fields: object) -> ModelSpec:
    """A valid remote entry; ``fields`` override or add."""
    return parse_model_spec({"name": name, "backend_url": "http://other:8000", **fields})


@pytest.fixture
def store(tmp_path: Path) -> RegistryStore:
    return RegistryStore(tmp_path / "registry.db")


def test_create_then_get_and_list(store: RegistryStore) -> None:
    created = store.create(spec("b-model"))
    store.create(spec("a/model:2", task="embed"))

    got = store.get("b-model")
    assert got.spec == created.spec
    assert got.created_at == got.updated_at == created.created_at
    assert [e.name for e in store.list()] == ["a/model:2", "b-model"]
    assert store.get("a/model:2").spec.task.value == "embed"
    assert store.count() == 2


def test_create_refuses_an_existing_name(store: RegistryStore) -> None:
    store.create(spec("m"))
    with pytest.raises(ModelExistsError) as info:
        store.create(spec("m", version="2"))
    assert info.value.status_code == 409
    assert store.get("m").spec.version == "1"


def test_replace_creates_then_replaces_keeping_created_at(store: RegistryStore) -> None:
    first, created = store.replace(spec("m"))
    assert created
    second, created = store.replace(spec("m", version="2"))
    assert not created
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    assert store.get("m").spec.version == "2"
    assert store.count() == 1


def test_get_and_delete_unknown_name(store: RegistryStore) -> None:
    with pytest.raises(ModelNotFoundError):
        store.get("nope")
    with pytest.raises(ModelNotFoundError):
        store.delete("nope")


def test_delete(store: RegistryStore) -> None:
    store.create(spec("m"))
    store.delete("m")
    assert store.list() == []
    with pytest.raises(ModelNotFoundError):
        store.get("m")


def test_entries_survive_a_new_store_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "registry.db"
    RegistryStore(path).create(spec("m", source=None, backend_url="https://x.example/v1"))
    reopened = RegistryStore(path)
    assert reopened.get("m").spec.backend_url == "https://x.example/v1"


def test_database_is_in_wal_mode(store: RegistryStore) -> None:
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_full_entry_round_trips(store: RegistryStore) -> None:
    local = parse_model_spec(
        {
            "name": "llama",
            "source": "/models/llama",
            "owner": "team-a",
            "keep_alive": 300,
            "resources": {"tensor_parallel_size": 2, "devices": [0, 1], "memory_gib": 20},
            "engine": {"max_model_len": 4096, "dtype": "bfloat16"},
        }
    )
    store.create(local)
    assert store.get("llama").spec == local


def test_concurrent_writers_from_threads(store: RegistryStore) -> None:
    names = [f"m{i}" for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: store.replace(spec(n)), names))
        list(pool.map(lambda n: store.replace(spec(n, version="2")), names))
    entries = store.list()
    assert sorted(e.name for e in entries) == sorted(names)
    assert {e.spec.version for e in entries} == {"2"}


def test_rows_written_before_the_split_into_kinds_still_read(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    store = RegistryStore(path)
    store.create(spec("far"))
    legacy = {
        "name": "far",
        "backend_url": "http://other:8000",
        "source": None,
        "autoload": True,
        "load_on_demand": False,
        "keep_alive": None,
        "evictable": False,
        "resources": {"tensor_parallel_size": 1},
        "engine": {},
    }
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE models SET spec = ? WHERE name = 'far'", (json.dumps(legacy),))
    got = RegistryStore(path).get("far").spec
    assert isinstance(got, RemoteModelSpec) and got.backend_url == "http://other:8000"
