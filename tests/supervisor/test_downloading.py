"""The ``downloading`` state: a model whose files are missing downloads, then loads.

A gated stand-in for the fetcher lets each test decide when the download moves and ends; the
engines are the recording stand-ins of the GPU lifecycle tests (simulated GPUs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from appliance.catalogue.schema import ModelSpec
from appliance.errors import ModelDownloadFailedError, ModelDownloadingError
from appliance.host.capacity import HostCapacity
from appliance.host.downloads import DownloadProgress
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.supervisor.test_gpu_lifecycle import LIMITS, RecordingMaker, entry, gpus

T = TypeVar("T")
S = ModelState


class GatedFetcher:
    """Says the files of the models in ``missing`` are absent; ``fetch`` waits for ``done``."""

    def __init__(self, missing: set[str]) -> None:
        self.missing_names = missing
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.fail: Exception | None = None
        self.cancelled = False
        self.progress: DownloadProgress | None = None

    def missing(self, spec: ModelSpec) -> bool:
        return spec.name in self.missing_names

    async def fetch(self, spec: ModelSpec, progress: DownloadProgress) -> None:
        self.progress = progress
        progress.total_bytes = 1000
        self.started.set()
        try:
            await self.done.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail is not None:
            raise self.fail
        progress.done_bytes = 1000
        self.missing_names.discard(spec.name)


def run(body: Callable[[Supervisor, RecordingMaker, GatedFetcher], Awaitable[T]]) -> T:
    async def main() -> T:
        maker = RecordingMaker()
        fetcher = GatedFetcher({"fresh"})
        inventory = gpus(1)
        supervisor = Supervisor(
            inventory,
            maker,
            limits=LIMITS,
            capacity=HostCapacity(inventory),
            fetcher=fetcher,
        )
        try:
            return await body(supervisor, maker, fetcher)
        finally:
            fetcher.done.set()
            await supervisor.shutdown()

    return asyncio.run(main())


def fresh(**extra: Any) -> ModelSpec:
    return entry("fresh", autoload=False, load_on_demand=True, **extra)


def test_missing_files_download_then_load_then_ready() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker, fetcher: GatedFetcher) -> None:
        await sup.start([fresh(resources={"memory_share": 0.5})])
        seen: list[S] = []
        loading = asyncio.create_task(sup.load("fresh"))
        await fetcher.started.wait()
        seen.append(sup.get("fresh").state)
        status = sup.status(sup.get("fresh"))
        assert status["download"]["total_bytes"] == 1000
        assert sup.get("fresh").allocation is None  # no device held while downloading
        assert maker.log == []  # no engine made yet
        fetcher.done.set()
        await loading
        seen.append(sup.get("fresh").state)
        assert seen == [S.DOWNLOADING, S.READY]
        assert sup.status(sup.get("fresh"))["download"] is None
        assert maker.log == [("start", "fresh"), ("started", "fresh")]

    run(body)


def test_a_request_meanwhile_gets_503_with_retry_after_from_the_rate() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker, fetcher: GatedFetcher) -> None:
        await sup.start([fresh()])
        with pytest.raises(ModelDownloadingError) as refused:
            async with sup.acquire("fresh"):
                pass
        assert sup.get("fresh").state is S.DOWNLOADING
        assert refused.value.retry_after == LIMITS.retry_after_seconds  # no rate measured yet
        # 100 bytes in 10 s: the 900 left take 90 s.
        progress = fetcher.progress
        assert progress is not None
        now = progress.started + 10.0
        progress.clock = lambda: now
        progress.done_bytes = 100
        with pytest.raises(ModelDownloadingError) as refused:
            async with sup.acquire("fresh"):
                pass
        assert refused.value.retry_after == 90
        assert refused.value.status_code == 503 and "downloading" in refused.value.message
        fetcher.done.set()
        await sup.load("fresh")
        async with sup.acquire("fresh"):
            pass

    run(body)


def test_unload_cancels_a_download() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker, fetcher: GatedFetcher) -> None:
        await sup.start([fresh()])
        loading = asyncio.create_task(sup.load("fresh"))
        await fetcher.started.wait()
        await sup.unload("fresh")
        assert sup.get("fresh").state is S.UNLOADED and fetcher.cancelled
        assert maker.log == []
        with pytest.raises(asyncio.CancelledError):
            await loading

    run(body)


def test_a_failed_download_is_failed_with_its_reason() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker, fetcher: GatedFetcher) -> None:
        await sup.start([fresh()])
        fetcher.fail = ModelDownloadFailedError("model 'fresh': org/fresh is gated")
        fetcher.done.set()
        with pytest.raises(ModelDownloadFailedError):
            await sup.load("fresh")
        handle = sup.get("fresh")
        assert handle.state is S.FAILED and "gated" in (handle.last_error or "")

    run(body)


def test_files_on_disk_load_without_downloading() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker, fetcher: GatedFetcher) -> None:
        await sup.start([entry("here", autoload=False)])
        await sup.load("here")
        assert sup.get("here").state is S.READY and not fetcher.started.is_set()

    run(body)


def test_retry_after_is_bounded() -> None:
    now = [0.0]
    progress = DownloadProgress(total_bytes=10**12, clock=lambda: now[0])
    now[0] = 10.0
    progress.done_bytes = 1
    assert progress.retry_after(5) == 300.0
    progress.done_bytes = 10**12 - 1
    assert progress.retry_after(5) == 1.0
