"""Residency tiers: sleep (level 1) before unload, bounded by the host budget.

On simulated GPUs with recording engines: an idle model with sleep mode goes to sleep at
keep_alive expiry and a request wakes it (its wake time measured); a load that needs room puts
evictable models to sleep, cheapest to wake first, and unloads only when the host budget
cannot take their weights; on CPU (no sleep mode) it is an unload as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from appliance.host.capacity import HostCapacity
from appliance.host.inventory import Device, DeviceKind, Inventory
from appliance.host.placement import Allocation, Demand
from appliance.host.residency import Sleeper, plan_sleep
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.supervisor.test_gpu_lifecycle import LIMITS, RecordingMaker, entry, gpus, run

S = ModelState


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` on the event loop until true; fail naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"not true after {timeout}s: {what}"
        await asyncio.sleep(0.01)


def idle_model(name: str = "a") -> object:
    return entry(name, keep_alive=0.1, load_on_demand=True, evictable=True)


def test_idle_model_sleeps_then_a_request_wakes_it() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([idle_model()])  # type: ignore[list-item]
        await sup.wait_autoload()
        handle = sup.get("a")
        await until(lambda: handle.sleep_level == 1, "asleep at level 1")
        assert handle.state is S.SLEEPING and handle.host_gib == 1.0
        assert ("sleep", "a", 1) in maker.log and ("stop", "a") not in maker.log
        async with sup.acquire("a"):  # wake on demand
            pass
        assert handle.state is S.READY and ("wake", "a") in maker.log
        assert sup.status(handle)["wake_seconds"] is not None

    run(body, host_budget=10.0)


def test_idle_model_is_unloaded_when_the_host_budget_is_full() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([idle_model()])  # type: ignore[list-item]
        await sup.wait_autoload()
        handle = sup.get("a")
        assert await handle.lifecycle.wait_for(S.UNLOADED, 10) is S.UNLOADED
        assert ("stop", "a") in maker.log
        assert not any(call[0] == "sleep" for call in maker.log)

    run(body, host_budget=0.5)  # the weights (1 GiB) do not fit


def test_on_cpu_an_idle_model_is_unloaded_as_before() -> None:
    async def main() -> None:
        maker = RecordingMaker()
        inventory = Inventory((Device(0, "cpu", 16.0, DeviceKind.CPU, "cpu0"),))
        sup = Supervisor(inventory, maker, limits=LIMITS, capacity=HostCapacity(inventory))
        try:
            await sup.start([entry("a", keep_alive=0.1, resources={"memory_gib": 1})])
            await sup.wait_autoload()
            handle = sup.get("a")
            assert await handle.lifecycle.wait_for(S.UNLOADED, 10) is S.UNLOADED
            assert ("stop", "a") in maker.log
        finally:
            await sup.shutdown()

    asyncio.run(main())


# -- making room: sleep before unload --------------------------------------------------------


def test_a_load_puts_an_evictable_model_to_sleep_instead_of_unloading_it() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", evictable=True, resources={"memory_share": 0.5}),
                entry("big", autoload=False, resources={"memory_share": 0.6}),
            ]
        )
        await sup.wait_autoload()
        await sup.load("big")
        a = sup.get("a")
        assert a.state is S.SLEEPING and a.sleep_level == 1 and sup.get("big").state is S.READY
        assert ("stop", "a") not in maker.log
        assert maker.log.index(("sleep", "a", 1)) < maker.log.index(("start", "big"))

    run(body)


def test_with_the_host_budget_full_the_load_unloads_instead() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", evictable=True, resources={"memory_share": 0.5}),
                entry("big", autoload=False, resources={"memory_share": 0.6}),
            ]
        )
        await sup.wait_autoload()
        await sup.load("big")
        assert sup.get("a").state is S.UNLOADED and ("stop", "a") in maker.log

    run(body, host_budget=0.5)


def _allocation(name: str, device: int, gib: float) -> Allocation:
    return Allocation(name, (device,), gib / 80.0, (gib + 1.0,), headroom_gib=1.0)


def test_cheapest_to_wake_sleeps_first_and_only_as_many_as_needed() -> None:
    inventory = gpus(1)
    allocations = [_allocation("slow", 0, 30.0), _allocation("quick", 0, 30.0)]
    sleepers = [
        Sleeper("slow", host_gib=30.0, wake_seconds=9.0, last_used=0.0),
        Sleeper("quick", host_gib=30.0, wake_seconds=1.0, last_used=5.0),
    ]
    demand = Demand("new", memory_gib=30.0)
    planned = plan_sleep(demand, inventory, allocations, sleepers, 100.0, default_share=0.9)
    assert planned is not None
    assert planned[1] == ["quick"]  # slept LRU would pick "slow"; "quick" wakes 9x faster


def test_sleepers_whose_weights_overfill_the_host_budget_are_passed_over() -> None:
    inventory = gpus(1)
    allocations = [_allocation("big", 0, 40.0), _allocation("small", 0, 30.0)]
    sleepers = [
        Sleeper("big", host_gib=40.0, wake_seconds=1.0, last_used=0.0),
        Sleeper("small", host_gib=30.0, wake_seconds=2.0, last_used=0.0),
    ]
    demand = Demand("new", memory_gib=30.0)
    planned = plan_sleep(demand, inventory, allocations, sleepers, 35.0, default_share=0.9)
    assert planned is not None and planned[1] == ["small"]
    # No budget at all: sleeping cannot make room; the caller unloads instead.
    assert plan_sleep(demand, inventory, allocations, sleepers, 0.0, default_share=0.9) is None


def test_fits_as_it_is_sleeps_nobody() -> None:
    planned = plan_sleep(
        Demand("new", memory_gib=10.0),
        gpus(1),
        [_allocation("a", 0, 30.0)],
        [Sleeper("a", host_gib=30.0, wake_seconds=None, last_used=0.0)],
        100.0,
        default_share=0.9,
    )
    assert planned is not None and planned[1] == []
