"""Pulling from a local hub mirror: which files, progress events, resume, and one-line errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from appliance.catalogue.schema import CatalogueFile, ModelSpec
from appliance.hub import pull
from appliance.hub.pull import PullError, PullEvent, plan_pull, run_pull, target_for_spec
from tests.hub_mirror import HubMirror, MirroredRepo

CHUNK = 10 * 1024 * 1024  # huggingface_hub writes downloads in chunks of this size
BIG = bytes(range(256)) * (CHUNK * 2 // 256 + 1000)  # a bit over two chunks
REPO = "test-org/tiny"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": BIG,
    "pytorch_model.bin": b"pickled twin of the safetensors",
    "original/consolidated.00.pth": b"meta's original checkpoint",
}


def entry(**fields: Any) -> ModelSpec:
    """A catalogue entry as models.yaml gives it (whatever class the schema makes of it)."""
    return CatalogueFile.model_validate({"models": [fields]}).models[0]


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubMirror]:
    """The mirror with one open and one gated repository, and a fresh cache pointed at it."""
    repos = {
        REPO: MirroredRepo(files=dict(FILES), commit="a" * 40),
        "test-org/gated": MirroredRepo(
            files={"config.json": b"{}"}, commit="b" * 40, gated_token="hf_secret"
        ),
    }
    with HubMirror(repos) as server:
        # What HF_ENDPOINT sets when the process starts (both are read at import).
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        yield server


def test_plan_lists_serving_files_with_sizes(mirror: HubMirror) -> None:
    plan = plan_pull(REPO)
    assert [f.path for f in plan.files] == ["config.json", "model.safetensors"]
    assert plan.commit == "a" * 40
    assert plan.total_bytes == len(BIG) + len(FILES["config.json"])
    assert plan.missing_bytes == plan.total_bytes


def test_pull_reports_progress_and_fills_the_cache(mirror: HubMirror) -> None:
    events: list[PullEvent] = []
    folder = run_pull(plan_pull(REPO), events.append)
    assert (folder / "model.safetensors").read_bytes() == BIG
    # The branch names the pulled commit, as the cache layout has it (vLLM offline finds it).
    assert (folder.parents[1] / "refs" / "main").read_text() == "a" * 40
    assert folder == Path(constants.HF_HUB_CACHE) / "models--test-org--tiny" / "snapshots" / (
        "a" * 40
    )
    kinds = [e.event for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done"
    done = [e.file for e in events if e.event == "file_done"]
    assert done == ["config.json", "model.safetensors"]
    progress = [e.done for e in events if e.event == "progress" and e.file == "model.safetensors"]
    assert progress and progress == sorted(progress) and progress[-1] == len(BIG)
    # A second pull finds everything cached and downloads nothing.
    assert plan_pull(REPO).missing_bytes == 0
    before = len(mirror.gets(REPO, "model.safetensors"))
    run_pull(plan_pull(REPO), lambda _: None)
    assert len(mirror.gets(REPO, "model.safetensors")) == before


def test_dropped_connection_resumes_with_a_range_request(
    mirror: HubMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror.controls.drop_once[(REPO, "model.safetensors")] = CHUNK + 4096
    folder = run_pull(plan_pull(REPO), lambda _: None)
    data = (folder / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(BIG).digest()
    gets = mirror.gets(REPO, "model.safetensors")
    assert [g.status for g in gets] == [200, 206]
    assert gets[1].range == f"bytes={CHUNK}-"  # from the last whole chunk written, not zero


def test_gated_without_token_is_one_line(mirror: HubMirror) -> None:
    with pytest.raises(PullError) as caught:
        plan_pull("test-org/gated")
    message = str(caught.value)
    assert "gated" in message and "HF_TOKEN" in message and "\n" not in message


def test_gated_with_token_pulls(mirror: HubMirror, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert [f.path for f in plan_pull("test-org/gated").files] == ["config.json"]


def test_missing_repo_is_one_line(mirror: HubMirror) -> None:
    with pytest.raises(PullError) as caught:
        plan_pull("test-org/nope")
    assert str(caught.value).startswith("no model test-org/nope on ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("bad", ["/etc", "../x/y", "a/b/c", "name", "org/na me"])
def test_not_a_hub_id(bad: str) -> None:
    with pytest.raises(PullError, match="not a hub id"):
        pull.check_repo_id(bad)


def test_full_disk_is_refused_before_any_download(
    mirror: HubMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull, "_free_bytes", lambda _: 1000)
    plan = plan_pull(REPO)
    with pytest.raises(
        PullError, match=r"not enough disk for test-org/tiny: it needs 21\.2 MB more"
    ):
        run_pull(plan, lambda _: None)
    assert mirror.gets(REPO, "model.safetensors") == []


def test_a_pull_keeps_the_reserve_free(mirror: HubMirror, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_pull(REPO)
    need = plan.missing_bytes
    reserve = 10**9
    # Room for the files, not for the files and the reserve: refused before any byte.
    monkeypatch.setattr(pull, "_free_bytes", lambda _: need + reserve - 1)
    with pytest.raises(PullError, match=r"more and keep 1\.0 GB free"):
        run_pull(plan, lambda _: None, reserve_bytes=reserve)
    assert mirror.gets(REPO, "model.safetensors") == []
    # The disk filling while it runs (another writer) stops it before the next file.
    free = iter([need + reserve, 0])
    monkeypatch.setattr(pull, "_free_bytes", lambda _: next(free, 0))
    with pytest.raises(PullError, match="not enough disk"):
        run_pull(plan, lambda _: None, reserve_bytes=reserve)
    fetched = sum(bool(mirror.gets(REPO, f.path)) for f in plan.files)
    assert fetched <= 1 < len(plan.files)


def test_offline_is_refused(mirror: HubMirror, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PullError, match="HF_HUB_OFFLINE is set"):
        plan_pull(REPO)


def test_target_for_spec(tmp_path: Path) -> None:
    hub = entry(name="m", source="org/model", engine={"revision": "v2", "download_dir": "/data/hf"})
    assert target_for_spec(hub) == pull.PullTarget("org/model", "v2", "/data/hf")
    (tmp_path / "weights").mkdir()
    with pytest.raises(PullError, match="local folder"):
        target_for_spec(entry(name="m", source="weights"), tmp_path)
    with pytest.raises(PullError, match="local folder"):
        target_for_spec(entry(name="m", source="package:pkg/model"))
    with pytest.raises(PullError, match="nothing to pull"):
        target_for_spec(entry(name="m", backend_url="http://box:8000"))
