"""The supervisor on simulated GPUs: device locks, the free-memory check, sleep levels.

A recording stand-in for the engine logs what the supervisor asks of it, in order; starts can
be held open with a gate, so the tests decide when each start ends instead of timing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import pytest

from appliance.catalogue.schema import ModelSpec, parse_model_spec
from appliance.errors import ConfigError, InsufficientResourcesError, LifecycleError
from appliance.host.capacity import HostCapacity
from appliance.host.device_release import DeviceRelease
from appliance.host.inventory import Device, DeviceKind, DeviceUse, Inventory
from appliance.host.placement import Allocation
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.fakes import SleepingEngine

T = TypeVar("T")
S = ModelState
LIMITS = SupervisorLimits(
    load_wait_seconds=2.0,
    drain_seconds=1.0,
    restart_max_tries=0,
    watch_interval_seconds=0.05,
    min_resident_seconds=0.0,  # eviction tests here are about which model goes, not when
)


class RecordingEngine(SleepingEngine):
    """Logs every call; ``start`` waits for the model's gate when it has one."""

    def __init__(self, name: str, log: list[tuple[Any, ...]], gate: asyncio.Event | None) -> None:
        super().__init__(name)
        self.log = log
        self.gate = gate
        self.pids: tuple[int, ...] = ()  # its engine-core processes, for a device release

    def process_ids(self) -> tuple[int, ...]:
        return self.pids

    async def start(self) -> None:
        self.log.append(("start", self.name))
        if self.gate is not None:
            await self.gate.wait()
        self.alive = True
        self.log.append(("started", self.name))

    async def stop(self) -> None:
        self.alive = False
        self.log.append(("stop", self.name))

    async def sleep(self, level: int) -> None:
        self.log.append(("sleep", self.name, level))

    async def wake_up(self) -> None:
        self.log.append(("wake", self.name))


class RecordingMaker:
    """Makes RecordingEngines sharing one log; remembers the allocation each was made for."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.allocations: dict[str, Allocation] = {}
        self.pids: dict[str, tuple[int, ...]] = {}

    def validate(self, spec: ModelSpec) -> None:
        pass

    def create(self, spec: ModelSpec, allocation: Allocation, inventory: Inventory) -> Any:
        self.allocations[spec.name] = allocation
        engine = RecordingEngine(spec.name, self.log, self.gates.get(spec.name))
        engine.pids = self.pids.get(spec.name, ())
        return engine


def gpus(count: int, size: float = 80.0) -> Inventory:
    return Inventory(
        tuple(Device(i, "H100", size, DeviceKind.GPU, f"GPU-{i}") for i in range(count))
    )


def entry(name: str, **extra: Any) -> ModelSpec:
    return parse_model_spec(
        {"name": name, "source": f"org/{name}", "engine": {"enable_sleep_mode": True}, **extra}
    )


def run(
    body: Callable[[Supervisor, RecordingMaker], Awaitable[T]],
    *,
    devices: int = 1,
    free: Callable[[], Mapping[int, float]] | None = None,
    host_budget: float = 100.0,
    release: DeviceRelease | None = None,
) -> T:
    async def main() -> T:
        maker = RecordingMaker()
        inventory = gpus(devices)
        capacity = HostCapacity(
            inventory, free_memory=free, sleep_host_budget_gib=host_budget, release=release
        )
        supervisor = Supervisor(inventory, maker, limits=LIMITS, capacity=capacity)
        try:
            return await body(supervisor, maker)
        finally:
            for gate in maker.gates.values():
                gate.set()
            await supervisor.shutdown()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait until ``condition`` holds, giving the loop turns; fail after ``timeout``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def settle() -> None:
    """Let every runnable task run until it blocks (a bounded number of loop turns)."""
    for _ in range(50):
        await asyncio.sleep(0)


# -- device locks ----------------------------------------------------------------------------


def test_starts_on_disjoint_gpus_overlap_and_changes_on_a_shared_gpu_wait() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("b", resources={"memory_gib": 10, "devices": [0]}),
                entry("a", autoload=False, resources={"memory_gib": 10, "devices": [0]}),
                entry("c", autoload=False, resources={"memory_gib": 10, "devices": [1]}),
            ]
        )
        await sup.wait_autoload()
        maker.gates = {"a": asyncio.Event(), "c": asyncio.Event()}
        load_a = asyncio.create_task(sup.load("a"))
        load_c = asyncio.create_task(sup.load("c"))
        # Both starts are under way at once: they use different GPUs.
        await until(lambda: ("start", "a") in maker.log and ("start", "c") in maker.log, "starts")
        # b shares gpu0 with a's start: its sleep and a's unload must wait for that start.
        sleep_b = asyncio.create_task(sup.sleep("b", level=1))
        await settle()
        assert ("sleep", "b", 1) not in maker.log and not sleep_b.done()
        maker.gates["c"].set()
        await load_c
        await settle()
        assert ("sleep", "b", 1) not in maker.log  # c's start was on gpu1: no help
        maker.gates["a"].set()
        await asyncio.gather(load_a, sleep_b)
        assert maker.log.index(("started", "a")) < maker.log.index(("sleep", "b", 1))

    run(body, devices=2)


def test_an_unload_on_a_gpu_waits_for_the_start_under_way_there() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("b", resources={"memory_gib": 10}),
                entry("a", autoload=False, resources={"memory_gib": 10}),
            ]
        )
        await sup.wait_autoload()
        maker.gates = {"a": asyncio.Event()}
        load_a = asyncio.create_task(sup.load("a"))
        await until(lambda: ("start", "a") in maker.log, "a's start")
        unload_b = asyncio.create_task(sup.unload("b"))
        await settle()
        assert ("stop", "b") not in maker.log and not unload_b.done()
        maker.gates["a"].set()
        await asyncio.gather(load_a, unload_b)
        assert maker.log.index(("started", "a")) < maker.log.index(("stop", "b"))

    run(body)


def test_overlapping_tensor_parallel_starts_do_not_deadlock() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        tp2 = {"tensor_parallel_size": 2, "memory_gib": 20}
        await sup.start(
            [
                entry("x", autoload=False, resources={**tp2, "devices": [0, 1]}),
                entry("y", autoload=False, resources={**tp2, "devices": [2, 1]}),
            ]
        )
        await asyncio.wait_for(asyncio.gather(sup.load("y"), sup.load("x")), 5)
        assert sup.get("x").state is S.READY and sup.get("y").state is S.READY
        # gpu1 is shared: one start ended before the other began.
        starts = [e for e in maker.log if e[0] in ("start", "started")]
        assert starts[0][1] == starts[1][1]

    run(body, devices=3)


# -- memory --------------------------------------------------------------------------------


def test_a_start_is_refused_when_the_gpu_has_less_free_than_placed() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([entry("a", autoload=False, resources={"memory_share": 0.6})])
        with pytest.raises(InsufficientResourcesError) as info:
            await sup.load("a")
        assert "gpu0 has 10.0 GiB free of 80.0, needs 49.0 GiB" in info.value.message
        assert sup.get("a").state is S.UNLOADED
        assert ("start", "a") not in maker.log

    run(body, free=lambda: {0: 10.0})


def test_the_engine_is_handed_the_share_and_reserves_the_headroom_too() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([entry("a", resources={"memory_share": 0.5})])
        await sup.wait_autoload()
        allocation = maker.allocations["a"]
        assert allocation.memory_share == pytest.approx(0.5)
        assert allocation.reserved_gib == (pytest.approx(41.0),)  # 0.5 x 80 + 1 of context

    run(body)


def test_two_half_gpu_models_do_not_share_one_gpu() -> None:
    """vLLM's start-up check would refuse the second: its context comes out of the free half."""
    half = [
        entry("a", resources={"memory_share": 0.5}),
        entry("b", resources={"memory_share": 0.5}),
    ]
    with pytest.raises(ConfigError, match="autoload models do not fit together") as info:
        HostCapacity(gpus(1)).check_catalogue(half)
    assert "plus 1.0 GiB of CUDA context" in info.value.message
    HostCapacity(gpus(2)).check_catalogue(half)

    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([half[0], half[1].model_copy(update={"autoload": False})])
        await sup.wait_autoload()
        with pytest.raises(InsufficientResourcesError):
            await sup.load("b")

    run(body)


def test_check_catalogue_names_a_model_too_big_for_an_empty_host() -> None:
    capacity = HostCapacity(gpus(1))
    with pytest.raises(ConfigError) as info:
        capacity.check_catalogue([entry("huge", autoload=False, resources={"memory_gib": 79.5})])
    assert info.value.message.startswith("model huge needs 1 device(s) with 79.5 GiB each plus")
    assert info.value.message.endswith("(even with nothing else loaded)")
    assert "\n" not in info.value.message
    capacity.check_catalogue([entry("fits", resources={"memory_gib": 78.0})])


# -- sleep -----------------------------------------------------------------------------------


def test_a_sleeping_model_gives_its_gpu_share_back_and_takes_it_again_to_wake() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", resources={"memory_share": 0.6}),
                # Without sleep mode: it cannot sleep to make room, so it is evicted.
                entry(
                    "b", autoload=False, evictable=True, resources={"memory_share": 0.5}, engine={}
                ),
            ]
        )
        await sup.wait_autoload()
        with pytest.raises(InsufficientResourcesError):
            await sup.load("b")
        await sup.sleep("a", level=1)
        status = sup.status(sup.get("a"))
        assert status["sleep_level"] == 1 and status["host_memory_gib"] == 1.0
        assert sup.get("a").allocation.reserved_gib == (1.0,)  # type: ignore[union-attr]
        await sup.load("b")  # fits beside a sleeping a
        await sup.wake("a")  # a needs its share back: b is evicted for it
        assert sup.get("a").state is S.READY and sup.get("b").state is S.UNLOADED
        assert sup.status(sup.get("a"))["sleep_level"] is None
        assert maker.log.index(("stop", "b")) < maker.log.index(("wake", "a"))

    run(body)


def test_a_wake_without_room_is_refused_and_the_model_stays_asleep() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", resources={"memory_share": 0.6}),
                entry("b", autoload=False, resources={"memory_share": 0.5}),
            ]
        )
        await sup.wait_autoload()
        await sup.sleep("a", level=2)
        await sup.load("b")
        with pytest.raises(InsufficientResourcesError, match="would not make room"):
            await sup.wake("a")
        assert sup.get("a").state is S.SLEEPING
        assert "cannot wake" in (sup.get("a").last_error or "")
        assert ("wake", "a") not in maker.log

    run(body)


def test_sleeping_evictable_models_are_evicted_for_a_load() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", evictable=True, resources={"memory_share": 0.9}),
                entry("big", autoload=False, resources={"memory_share": 0.98}),
            ]
        )
        await sup.wait_autoload()
        await sup.sleep("a", level=1)
        await sup.load("big")  # a's context alone leaves too little: a goes
        assert sup.get("a").state is S.UNLOADED and sup.get("big").state is S.READY

    run(body)


def test_level_one_sleep_is_bounded_by_the_host_budget() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        small = {"memory_share": 0.3}
        await sup.start([entry("a", resources=small), entry("b", resources=small)])
        await sup.wait_autoload()
        await sup.sleep("a", level=1)
        with pytest.raises(LifecycleError, match=r"0\.5 of 1\.5 GiB"):
            await sup.sleep("b", level=1)
        assert sup.get("b").state is S.READY
        await sup.sleep("b", level=2)  # level 2 keeps no weights on the host
        assert sup.status(sup.get("b"))["host_memory_gib"] is None

    run(body, host_budget=1.5)


# -- stop, then start on the same GPU --------------------------------------------------------


class Exits:
    """A process table whose processes run until the test lets them go."""

    def __init__(self, tree: dict[int, list[int]]) -> None:
        self.children = tree
        self.running: set[int] = set(tree) | {c for cs in tree.values() for c in cs}

    def tree(self, pids: Iterable[int]) -> frozenset[int]:
        found = {p for p in pids if p in self.running}
        for pid in list(found):
            found.update(c for c in self.children.get(pid, []) if c in self.running)
        return frozenset(found)

    def alive(self, pids: Iterable[int]) -> frozenset[int]:
        return frozenset(p for p in pids if p in self.running)


def test_a_start_waits_until_the_stopped_engines_workers_are_gone_and_its_memory_is_back() -> None:
    """vLLM's stop returns with the TP worker still exiting and the driver still freeing."""
    exits = Exits({100: [101]})
    memory = {"used": 42.0, "listed": {100: 1.0, 101: 40.0}}

    def read() -> dict[int, DeviceUse]:
        return {0: DeviceUse(memory["used"], dict(memory["listed"]))}  # type: ignore[arg-type]

    release = DeviceRelease(read, exits, poll_seconds=0.001, timeout_seconds=5)

    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        maker.pids = {"a": (100,)}
        await sup.start(
            [
                entry("a", resources={"memory_share": 0.5, "devices": [0]}),
                entry("b", autoload=False, resources={"memory_share": 0.5, "devices": [0]}),
            ]
        )
        await sup.wait_autoload()
        unload = asyncio.create_task(sup.unload("a"))
        await until(lambda: ("stop", "a") in maker.log, "a's stop")
        load = asyncio.create_task(sup.load("b"))
        exits.running.discard(100)  # the core is joined: the worker (101) is still there
        await settle()
        assert ("start", "b") not in maker.log and not unload.done()
        exits.running.discard(101)  # the worker saw its death pipe close
        await settle()
        assert ("start", "b") not in maker.log  # NVML still lists it: memory not freed yet
        memory.update(used=1.0, listed={})
        await asyncio.gather(unload, load)
        assert maker.log.index(("stop", "a")) < maker.log.index(("start", "b"))

    run(body, release=release)


def test_a_stop_whose_memory_never_comes_back_is_logged_and_frees_the_lock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.supervisor")
    exits = Exits({100: []})
    release = DeviceRelease(
        lambda: {0: DeviceUse(42.0, {100: 41.0})}, exits, poll_seconds=0.001, timeout_seconds=0.2
    )

    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        maker.pids = {"a": (100,)}
        await sup.start([entry("a", resources={"memory_share": 0.5})])
        await sup.wait_autoload()
        unload = asyncio.create_task(sup.unload("a"))
        await until(lambda: ("stop", "a") in maker.log, "a's stop")
        exits.running.discard(100)  # gone, but NVML keeps listing it
        await unload
        assert sup.get("a").state is S.UNLOADED
        assert not sup.capacity.locks.busy(0)

    run(body, release=release)
    assert "NVML still lists pid(s) [100]" in caplog.text


def test_placement_holds_what_a_sleep_was_measured_to_leave() -> None:
    """vLLM keeps the context, NCCL and allocations outside its pool: 6 GiB here, not 1."""
    memory = {"used": 41.0}
    exits = Exits({})

    def read() -> dict[int, DeviceUse]:
        return {0: DeviceUse(memory["used"], {})}

    release = DeviceRelease(read, exits, poll_seconds=0.001)

    class Sleepy(RecordingMaker):
        def create(self, spec: ModelSpec, allocation: Allocation, inventory: Inventory) -> Any:
            engine = super().create(spec, allocation, inventory)
            original = engine.sleep

            async def sleep(level: int) -> None:
                await original(level)
                memory["used"] = 6.0  # freed 35 of the 41 GiB reserved

            engine.sleep = sleep
            return engine

    async def main() -> None:
        maker = Sleepy()
        inventory = gpus(1)
        capacity = HostCapacity(inventory, release=release)
        sup = Supervisor(inventory, maker, limits=LIMITS, capacity=capacity)
        try:
            await sup.start(
                [
                    entry("a", evictable=True, resources={"memory_share": 0.5}),
                    entry("b", autoload=False, resources={"memory_share": 0.93}),
                ]
            )
            await sup.wait_autoload()
            await sup.sleep("a", level=1)
            assert sup.get("a").allocation.reserved_gib == (pytest.approx(6.0),)  # type: ignore[union-attr]
            assert capacity.kept_gib("a") == (pytest.approx(6.0),)
            # b takes 74.4 + 1: beside the 1 GiB once assumed it would fit (76.4 of 80), beside
            # the 6 GiB a really keeps it does not, so a must go first.
            plan = sup.plan_load("b")
            assert plan.evict == ["a"]
        finally:
            await sup.shutdown()

    asyncio.run(main())


def test_a_tensor_parallel_sleep_without_weight_sizes_counts_every_gpus_share() -> None:
    """Under HF_HUB_OFFLINE the engine cannot size its weight files: the fallback must count
    the weights of all TP ranks (each pins its shard in host RAM), not one GPU's share."""

    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([entry("tp", resources={"tensor_parallel_size": 4, "memory_gib": 20})])
        await sup.wait_autoload()
        sup.get("tp").engine.weights = None  # type: ignore[union-attr]
        with pytest.raises(LifecycleError, match=r"its weights \(86\.0 GiB\)"):
            await sup.sleep("tp", level=1)  # 4 x (20 + 1.5): over the 50 GiB budget
        assert sup.get("tp").state is S.READY

    run(body, devices=4, host_budget=50.0)


def test_making_room_by_sleep_counts_every_tp_ranks_weights_without_weight_sizes() -> None:
    """The planner choosing whom to sleep for a load counts host RAM as the sleep itself
    does: 4 x (20 + 1.5) GiB for a TP=4 engine with no weight sizes (HF_HUB_OFFLINE), over the
    50 GiB budget, so it evicts instead of planning a sleep the budget then refuses."""

    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        tp = entry("tp", evictable=True, resources={"tensor_parallel_size": 4, "memory_gib": 20})
        big = entry(
            "big", autoload=False, resources={"tensor_parallel_size": 4, "memory_share": 0.9}
        )
        await sup.start([tp, big])
        await sup.wait_autoload()
        sup.get("tp").engine.weights = None  # type: ignore[union-attr]
        await sup.load("big")
        assert sup.get("big").state is S.READY and sup.get("tp").state is S.UNLOADED

    run(body, devices=4, host_budget=50.0)
