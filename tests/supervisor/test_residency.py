"""Residency on keep_alive expiry: sleep (level 1) before unload, bounded by the host budget.

On simulated GPUs with recording engines: an idle model with sleep mode goes to sleep and a
request wakes it (its wake time measured); with the host budget full it is unloaded; on CPU
(no sleep mode) it is unloaded as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from appliance.supervisor.capacity import HostCapacity
from appliance.supervisor.inventory import Device, DeviceKind, Inventory
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.supervisor.test_gpu_lifecycle import LIMITS, RecordingMaker, entry, run

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
