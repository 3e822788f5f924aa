"""The supervisor's own logic with fake engines: races, drains, eviction, supervision.

Fakes stand in for vLLM here only: these are unit tests of the supervisor's bookkeeping. The
real engines are exercised by the integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from appliance.catalogue.schema import ModelSpec, parse_model_spec
from appliance.errors import (
    EvictionTooSoonError,
    InsufficientResourcesError,
    LifecycleError,
    ModelDrainingError,
    ModelFailedError,
    ModelLoadingError,
    ModelNotReadyError,
    ModelUnloadedError,
    NotSupportedError,
    RateLimitedError,
)
from appliance.host.inventory import Device, DeviceKind, Inventory, cpu_inventory
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.states import ModelState, Transition
from appliance.supervisor.supervisor import Supervisor
from tests.fakes import FakeMaker

T = TypeVar("T")
S = ModelState


class Recorder:
    """A SupervisorObserver that keeps everything."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.loads: list[str] = []
        self.restarts: list[str] = []
        self.evictions: list[str] = []

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def on_load(self, model: str, seconds: float) -> None:
        self.loads.append(model)

    def on_restart(self, model: str) -> None:
        self.restarts.append(model)

    def on_eviction(self, model: str) -> None:
        self.evictions.append(model)


LIMITS = SupervisorLimits(
    load_wait_seconds=1.0,
    drain_seconds=1.0,
    restart_max_tries=2,
    restart_backoff_seconds=0.05,
    watch_interval_seconds=0.02,
    min_resident_seconds=0.0,  # the eviction tests below are about which model goes, not when
)


def spec(name: str, **extra: Any) -> ModelSpec:
    """A local entry needing 4 GiB."""
    return parse_model_spec(
        {"name": name, "source": f"org/{name}", "resources": {"memory_gib": 4}, **extra}
    )


def run(
    body: Callable[[Supervisor, FakeMaker, Recorder], Awaitable[T]],
    *,
    budget: float = 10.0,
    limits: SupervisorLimits = LIMITS,
    start_delay: float = 0.05,
) -> T:
    """Run ``body`` with a fresh supervisor on a CPU budget of ``budget`` GiB."""

    async def main() -> T:
        maker = FakeMaker(start_delay)
        recorder = Recorder()
        supervisor = Supervisor(cpu_inventory(budget), maker, limits=limits, observer=recorder)
        try:
            return await body(supervisor, maker, recorder)
        finally:
            await supervisor.shutdown()

    return asyncio.run(main())


async def wait_state(supervisor: Supervisor, name: str, state: ModelState) -> None:
    """Wait (bounded) until ``name`` is in ``state``."""
    await asyncio.wait_for(supervisor.get(name).lifecycle.wait_for((state,), None), 5)


def test_autoload_and_acquire() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a"), spec("b", autoload=False)])
        await sup.wait_autoload()
        assert sup.get("a").state is S.READY and sup.get("b").state is S.UNLOADED
        async with sup.acquire("a") as engine:
            assert engine is maker.made[0]
            assert sup.get("a").in_flight == 1
        assert sup.get("a").in_flight == 0
        with pytest.raises(ModelUnloadedError):
            async with sup.acquire("b"):
                pass
        assert rec.loads == ["a"]

    run(body)


def test_concurrent_loads_of_one_model_start_one_engine() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False)])
        await asyncio.gather(*(sup.load("a") for _ in range(5)))
        assert len(maker.made) == 1 and sup.get("a").state is S.READY

    run(body)


def test_concurrent_load_and_unload_of_one_model() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False)])
        load = asyncio.create_task(sup.load("a"))
        await asyncio.sleep(0.01)  # the load is under way
        await sup.unload("a")  # waits for the load, then unloads: no half-built engine left
        await load
        assert sup.get("a").state is S.UNLOADED
        assert all(not e.alive for e in maker.made) and maker.made[0].stopped == 1
        states = [(t.old, t.new) for t in rec.transitions]
        assert states == [
            (S.UNLOADED, S.LOADING),
            (S.LOADING, S.READY),
            (S.READY, S.DRAINING),
            (S.DRAINING, S.UNLOADED),
        ]

    run(body)


def test_a_request_racing_a_load_waits_for_it() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False)])
        load = asyncio.create_task(sup.load("a"))
        await asyncio.sleep(0.01)
        assert sup.get("a").state is S.LOADING
        async with sup.acquire("a") as engine:  # waits (bounded) for the load
            assert engine.is_alive()
        await load

    run(body, start_delay=0.2)


def test_a_request_for_a_slow_load_gets_503_after_the_bound() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False)])
        load = asyncio.create_task(sup.load("a"))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelLoadingError) as caught:
            async with sup.acquire("a"):
                pass
        assert caught.value.retry_after is not None
        await load

    run(body, start_delay=1.5)


def test_load_on_demand() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False, load_on_demand=True)])
        async with sup.acquire("a") as engine:
            assert engine.is_alive()

    run(body)


def test_unload_drains_in_flight_requests_and_refuses_new_ones() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a")])
        await sup.wait_autoload()
        finished = asyncio.Event()

        async def request() -> None:
            async with sup.acquire("a"):
                await asyncio.sleep(0.3)
            finished.set()

        running = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        unloading = asyncio.create_task(sup.unload("a"))
        await asyncio.sleep(0.01)
        assert sup.get("a").state is S.DRAINING
        with pytest.raises(ModelDrainingError):
            async with sup.acquire("a"):
                pass
        await unloading
        assert finished.is_set(), "unload must wait for the request in flight"
        assert sup.get("a").state is S.UNLOADED
        await running

    run(body)


def test_an_engine_that_dies_fails_then_restarts() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a")])
        await sup.wait_autoload()
        maker.made[0].alive = False  # the engine's process died
        await wait_state(sup, "a", S.FAILED)
        with pytest.raises(ModelFailedError):
            async with sup.acquire("a"):
                pass
        await wait_state(sup, "a", S.READY)
        assert rec.restarts == ["a"] and len(maker.made) == 2
        assert maker.made[0].stopped == 1  # the dead engine was cleaned up

    run(body)


def test_restarts_give_up_after_the_set_number_of_tries() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a")])
        await sup.wait_autoload()
        maker.failing.add("a")
        maker.made[0].alive = False
        deadline = asyncio.get_running_loop().time() + 5
        while len(rec.restarts) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # would be long enough for a third try
        assert rec.restarts == ["a", "a"]
        assert sup.get("a").state is S.FAILED and "cannot start" in (sup.get("a").last_error or "")

    run(body)


def test_a_model_that_does_not_fit_stays_unloaded_with_a_message() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a"), spec("b", autoload=False)])
        await sup.wait_autoload()
        with pytest.raises(InsufficientResourcesError) as caught:
            await sup.load("b")
        assert "b" in caught.value.message and "free" in caught.value.message
        assert sup.get("b").state is S.UNLOADED and sup.get("a").state is S.READY

    run(body, budget=6.0)


def test_evictable_models_make_room_least_recently_used_first() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start(
            [spec("old", evictable=True), spec("new", evictable=True), spec("c", autoload=False)]
        )
        await sup.wait_autoload()
        async with sup.acquire("new"):
            pass  # "new" is now the most recently used
        evicted = await sup.load("c")
        assert evicted.name == "c" and sup.get("c").state is S.READY
        assert rec.evictions == ["old"]
        assert sup.get("old").state is S.UNLOADED and sup.get("new").state is S.READY
        assert sup.get("c").evicted == ["old"]

    run(body, budget=8.0)


def test_a_model_loaded_moments_ago_is_not_evicted_for_another() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", evictable=True), spec("b", evictable=True, autoload=False)])
        await sup.wait_autoload()
        with pytest.raises(EvictionTooSoonError) as caught:
            await sup.load("b")
        # A 503 that says when the room frees up, not a 507: b fits once a has stayed its time.
        assert caught.value.status_code == 503
        assert caught.value.retry_after is not None and 50 <= caught.value.retry_after <= 60
        assert "'a'" in caught.value.message and "60s" in caught.value.message
        assert sup.get("b").state is S.UNLOADED and sup.get("a").state is S.READY
        assert rec.evictions == []
        # Once a has been loaded for the minimum time, the same load evicts it.
        sup.get("a").ready_since -= 60
        await sup.load("b")
        assert rec.evictions == ["a"] and sup.get("b").state is S.READY
        # b was just loaded: a load of a now may not evict it back (no ping-pong).
        with pytest.raises(EvictionTooSoonError):
            await sup.load("a")
        assert sup.get("b").state is S.READY and rec.evictions == ["a"]

    run(body, budget=6.0, limits=replace(LIMITS, min_resident_seconds=60.0))


def test_a_request_that_would_evict_a_young_model_is_told_when_to_retry() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        on_demand = {"evictable": True, "autoload": False, "load_on_demand": True}
        await sup.start([spec("a", **on_demand), spec("b", **on_demand)])
        async with sup.acquire("a"):
            pass
        with pytest.raises(EvictionTooSoonError) as caught:
            async with sup.acquire("b"):
                pass
        assert caught.value.retry_after is not None and caught.value.retry_after > 50
        assert sup.get("a").state is S.READY and sup.get("b").state is S.UNLOADED

    run(body, budget=6.0, limits=replace(LIMITS, min_resident_seconds=60.0))


def test_young_models_that_would_not_make_room_anyway_give_a_507() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        big = spec("big", autoload=False, resources={"memory_gib": 9})
        await sup.start([spec("a", evictable=True), big])
        await sup.wait_autoload()
        with pytest.raises(InsufficientResourcesError):
            await sup.load("big")
        assert sup.get("a").state is S.READY and rec.evictions == []

    run(body, budget=8.0, limits=replace(LIMITS, min_resident_seconds=60.0))


def test_keep_alive_unloads_an_idle_model() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", keep_alive=0.2)])
        await sup.wait_autoload()
        await wait_state(sup, "a", S.UNLOADED)
        assert any("idle" in t.reason for t in rec.transitions)

    run(body)


def test_apply_catalogue_touches_only_the_difference() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("keep"), spec("gone"), spec("edit")])
        await sup.wait_autoload()
        keep_engine = sup.get("keep").engine
        changes = await sup.apply_catalogue([spec("keep"), spec("edit", version="2"), spec("new")])
        assert changes == {"added": ["new"], "removed": ["gone"], "changed": ["edit"]}
        assert sup.get("keep").engine is keep_engine  # untouched
        assert [h.name for h in sup.handles()] == ["keep", "edit", "new"]
        assert all(h.state is S.READY for h in sup.handles())

    run(body, budget=20.0)


def test_sleep_is_refused_without_a_gpu() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", engine={"enable_sleep_mode": True})])
        await sup.wait_autoload()
        with pytest.raises(NotSupportedError, match="needs a GPU"):
            await sup.sleep("a")
        assert sup.get("a").state is S.READY

    run(body)


def gpu_run(body: Callable[[Supervisor, FakeMaker, Recorder], Awaitable[T]]) -> T:
    """Like ``run`` on one simulated 80 GiB GPU."""

    async def main() -> T:
        maker = FakeMaker()
        recorder = Recorder()
        inventory = Inventory((Device(0, "H100", 80.0, DeviceKind.GPU, "GPU-0"),))
        supervisor = Supervisor(inventory, maker, limits=LIMITS, observer=recorder)
        try:
            return await body(supervisor, maker, recorder)
        finally:
            await supervisor.shutdown()

    return asyncio.run(main())


def test_sleep_and_wake_on_a_gpu() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start(
            [
                spec("a", engine={"enable_sleep_mode": True}),
                spec("b", load_on_demand=True, engine={"enable_sleep_mode": True}),
            ]
        )
        await sup.wait_autoload()
        await sup.sleep("a", level=1)
        assert sup.get("a").state is S.SLEEPING and maker.made[0].sleeping == 1
        with pytest.raises(ModelNotReadyError):
            async with sup.acquire("a"):
                pass
        await sup.wake("a")
        assert sup.get("a").state is S.READY and maker.made[0].sleeping == 0
        # A load_on_demand model wakes for a request.
        await sup.sleep("b", level=2)
        async with sup.acquire("b") as engine:
            assert engine.is_alive()
        assert sup.get("b").state is S.READY
        assert len(maker.made) == 2  # woken, not reloaded

    gpu_run(body)


def test_sleep_needs_sleep_mode_enabled() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a")])
        await sup.wait_autoload()
        with pytest.raises(LifecycleError, match="enable_sleep_mode"):
            await sup.sleep("a")

    gpu_run(body)


def test_a_full_queue_is_refused_with_429() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", max_queue=2)])
        await sup.wait_autoload()
        release = asyncio.Event()

        async def hold() -> None:
            async with sup.acquire("a"):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(RateLimitedError) as caught:
            async with sup.acquire("a"):
                pass
        assert caught.value.retry_after == 1 and "limit" in caught.value.message
        release.set()
        await asyncio.gather(*holders)
        async with sup.acquire("a"):
            pass  # room again

    run(body)


def test_requests_waiting_for_a_load_count_towards_the_queue() -> None:
    async def body(sup: Supervisor, maker: FakeMaker, rec: Recorder) -> None:
        await sup.start([spec("a", autoload=False, load_on_demand=True, max_queue=1)])

        async def ask() -> None:
            async with sup.acquire("a"):
                pass

        first = asyncio.create_task(ask())
        await asyncio.sleep(0.01)
        with pytest.raises(RateLimitedError):
            await ask()
        await first

    run(body, start_delay=0.2)
