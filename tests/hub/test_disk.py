"""What is on disk per catalogue entry, and freeing a hub model's cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from appliance.catalogue.schema import CatalogueFile, ModelSpec
from appliance.hub.disk import files_on_disk, loadable, remove_from_cache
from appliance.hub.pull import PullTarget


def entry(**fields: Any) -> ModelSpec:
    """A catalogue entry as models.yaml gives it (whatever class the schema makes of it)."""
    return CatalogueFile.model_validate({"models": [fields]}).models[0]


def _cached(cache: Path, repo: str, files: dict[str, bytes], commit: str = "c" * 40) -> Path:
    """A cache entry laid out as huggingface_hub writes it: blobs, a snapshot, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for index, (name, data) in enumerate(files.items()):
        blob = root / "blobs" / f"{index:040d}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../..", *[".."] * (len(Path(name).parts) - 1), "blobs", blob.name))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_pulled_hub_model_is_present_with_its_size(cache: Path) -> None:
    root = _cached(cache, "org/m", {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    found = files_on_disk(entry(name="m", source="org/m"))
    assert found.present and found.removable
    assert found.size_bytes == 1002
    assert found.location == str(root)


def test_a_missing_shard_is_not_present(cache: Path) -> None:
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    _cached(
        cache,
        "org/m",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-1.safetensors": b"x",
        },
    )
    assert not files_on_disk(entry(name="m", source="org/m")).present


def test_not_pulled(cache: Path) -> None:
    found = files_on_disk(entry(name="m", source="org/other"))
    assert not found.present and found.size_bytes == 0


def test_local_folder_is_reported_never_removable(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"y" * 10)
    found = files_on_disk(entry(name="m", source="weights"), tmp_path)
    assert found.present and not found.removable and found.size_bytes == 12
    assert loadable(folder)


def test_remove_frees_the_cache_entry(cache: Path) -> None:
    root = _cached(cache, "org/m", {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    assert remove_from_cache(PullTarget("org/m")) == 1002
    assert not root.exists()
    assert remove_from_cache(PullTarget("org/m")) == 0
