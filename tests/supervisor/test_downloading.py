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
from appliance.host.placement import PlacementError
from appliance.host.startup_plan import StartupPlan
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.supervisor.test_gpu_lifecycle import LIMITS, RecordingMaker, entry, gpus, settle

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


# -- first run: placement follows the start-up plan, not download completion --------------------


class PerModelFetcher(GatedFetcher):
    """Each missing model's download ends when the test sets its own gate."""

    def __init__(self, missing: set[str]) -> None:
        super().__init__(missing)
        self.gates = {name: asyncio.Event() for name in missing}

    async def fetch(self, spec: ModelSpec, progress: DownloadProgress) -> None:
        await self.gates[spec.name].wait()
        if spec.name == "broken":
            raise OSError("disk full")
        self.missing_names.discard(spec.name)


def test_autoload_models_follow_the_start_up_plan_whatever_downloads_first() -> None:
    """Placed as their downloads end (b, c, then a), b and c would spread over both GPUs and
    leave a (73 GiB) no room; placed where the plan put them, all three fit."""

    async def main() -> None:
        maker = RecordingMaker()
        fetcher = PerModelFetcher({"a", "b", "c", "broken"})
        inventory = gpus(2)
        sup = Supervisor(
            inventory, maker, limits=LIMITS, capacity=HostCapacity(inventory), fetcher=fetcher
        )
        try:
            await sup.start(
                [
                    entry("a", resources={"memory_share": 0.9}),
                    entry("broken", resources={"memory_share": 0.05}),
                    entry("b", resources={"memory_share": 0.45}),
                    entry("c", resources={"memory_share": 0.45}),
                ]
            )
            for name in ("b", "broken", "c", "a"):  # the big one's download ends last
                fetcher.gates[name].set()
                await settle()
            await sup.wait_autoload()
            placed = {name: a.devices for name, a in maker.allocations.items()}
            assert placed == {"a": (0,), "b": (1,), "c": (1,)}
            assert all(sup.get(n).state is S.READY for n in "abc")
            assert sup.get("broken").state is S.FAILED
        finally:
            for gate in fetcher.gates.values():
                gate.set()
            await sup.shutdown()

    asyncio.run(main())


def test_without_the_plan_that_completion_order_would_not_fit() -> None:
    """The fault the plan prevents, on the same placement arithmetic."""
    capacity = HostCapacity(gpus(2))
    b = capacity.place(entry("b", resources={"memory_share": 0.45}), [])
    c = capacity.place(entry("c", resources={"memory_share": 0.45}), [b])
    assert {b.devices, c.devices} == {(0,), (1,)}
    with pytest.raises(PlacementError):
        capacity.place(entry("a", resources={"memory_share": 0.9}), [b, c])


def test_a_plan_that_no_longer_fits_is_not_forced() -> None:
    capacity = HostCapacity(gpus(2))
    plan = StartupPlan.of(capacity, [entry("a", resources={"memory_share": 0.9})])
    assert plan.devices("a") == (0,)
    squatter = capacity.place(entry("x", resources={"memory_share": 0.5, "devices": [0]}), [])
    demand = capacity.demand(entry("a", resources={"memory_share": 0.9}))
    assert plan.follow(demand, [squatter]).devices is None  # placed freely: gpu1 then
    assert plan.devices("a") is None  # followed once only
