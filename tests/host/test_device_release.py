"""A GPU engine's stop ends when its process tree is gone and its memory is back, and a sleep
is measured for what it leaves; on recorded vLLM behaviour and simulated NVML readings.

What vLLM does at stop (0.32): ``shutdown`` in v1/utils.py SIGTERMs the core, waits 5 s, then
kills its tree; tensor-parallel workers leave when their death pipe closes
(multiproc_executor.py), after the core; the driver frees memory after each exits. The
process table and NVML here replay that, on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping

import pytest

from appliance.errors import DeviceReleaseError
from appliance.host.device_release import DeviceRelease, PsutilProcesses, engine_tree
from appliance.host.inventory import DeviceUse
from appliance.host.placement import Allocation
from appliance.host.sleep_residue import measure_residue

CORE, WORKER0, WORKER1 = 100, 101, 102


class Clock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Processes:
    """A process table: each pid exits at the given clock time (None: never)."""

    def __init__(
        self, clock: Clock, exits: Mapping[int, float | None], children: Mapping[int, list[int]]
    ) -> None:
        self.clock, self.exits, self.children = clock, dict(exits), children

    def tree(self, pids: Iterable[int]) -> frozenset[int]:
        # Like psutil: a process that has exited names no children (they were re-parented).
        found: set[int] = set()
        todo = list(self.alive(pids))
        while todo:
            pid = todo.pop()
            found.add(pid)
            todo.extend(self.alive(self.children.get(pid, [])))
        return frozenset(found)

    def alive(self, pids: Iterable[int]) -> frozenset[int]:
        return frozenset(
            p
            for p in pids
            if p in self.exits and (self.exits[p] is None or self.clock.now < self.exits[p])
        )


class Engine:
    """An engine whose core is ``CORE``; stopping it is what vLLM's shutdown does."""

    def __init__(self, pids: tuple[int, ...] = (CORE,)) -> None:
        self.pids = pids
        self.stopped = False

    def process_ids(self) -> tuple[int, ...]:
        return self.pids

    async def stop(self) -> None:
        self.stopped = True


def nvml(clock: Clock, frees_at: float, used: float, pids: Mapping[int, float]) -> object:
    """gpu0 holds ``used`` GiB (``pids`` listed) until ``frees_at``, then 2 GiB (others')."""

    def read() -> dict[int, DeviceUse]:
        if clock.now < frees_at:
            return {0: DeviceUse(used, dict(pids))}
        return {0: DeviceUse(2.0, {})}

    return read


def allocation(reserved: float = 41.0, devices: tuple[int, ...] = (0,)) -> Allocation:
    return Allocation("m", devices, 0.5, (reserved,) * len(devices), headroom_gib=1.0)


def release(
    clock: Clock, processes: Processes, read: object, timeout: float = 60.0
) -> DeviceRelease:
    return DeviceRelease(
        read, processes, timeout_seconds=timeout, poll_seconds=0.5, clock=clock, sleep=clock.sleep
    )  # type: ignore[arg-type]


def test_the_tree_is_collected_before_the_stop_and_every_worker_is_waited_for() -> None:
    clock = Clock()
    # The core exits first (killed 5 s after SIGTERM at worst), its TP workers later.
    processes = Processes(
        clock, {CORE: 0.5, WORKER0: 3.0, WORKER1: 7.0}, {CORE: [WORKER0, WORKER1]}
    )
    read = nvml(clock, frees_at=8.0, used=43.0, pids={WORKER0: 20.0, WORKER1: 20.0})
    engine = Engine()
    report = asyncio.run(release(clock, processes, read).stop("m", engine, allocation()))
    assert engine.stopped
    # Not when the core was gone (0 s), nor the last worker (7 s): when NVML freed (8 s).
    assert report.seconds == pytest.approx(8.0)
    assert report.readings == {0: "pids"}


def test_a_tree_collected_after_the_core_exited_would_miss_the_workers() -> None:
    """Why the tree is read first: once the core has gone, its orphans are not found from it."""
    clock = Clock()
    processes = Processes(clock, {CORE: 0.5, WORKER0: 5.0}, {CORE: [WORKER0]})
    assert engine_tree(Engine(), processes) == {CORE, WORKER0}
    clock.now = 1.0
    assert engine_tree(Engine(), processes) == frozenset()


def test_a_leftover_process_times_out_with_a_clear_error() -> None:
    clock = Clock()
    processes = Processes(clock, {CORE: 0.5, WORKER0: None}, {CORE: [WORKER0]})
    read = nvml(clock, frees_at=0.0, used=43.0, pids={})
    with pytest.raises(DeviceReleaseError) as info:
        asyncio.run(release(clock, processes, read, timeout=30).stop("m", Engine(), allocation()))
    assert f"process(es) [{WORKER0}] of its engine still running" in info.value.message
    assert info.value.message.startswith("model m: 30s after its engine was stopped")


def test_memory_still_listed_after_the_processes_exit_is_waited_for_then_reported() -> None:
    clock = Clock()
    processes = Processes(clock, {CORE: 0.5}, {})
    read = nvml(clock, frees_at=1e9, used=43.0, pids={CORE: 41.0})  # the driver never frees
    with pytest.raises(DeviceReleaseError, match=rf"gpu0: NVML still lists pid\(s\) \[{CORE}\]"):
        asyncio.run(release(clock, processes, read, timeout=10).stop("m", Engine(), allocation()))


def test_in_a_container_device_totals_decide_and_say_so() -> None:
    """NVML lists host pids there: none matches ours, so the device's used memory must fall."""
    clock = Clock()
    processes = Processes(clock, {CORE: 0.5}, {})
    host_pids = {987654: 41.0}  # the core's pid as the host sees it
    read = nvml(clock, frees_at=4.0, used=43.0, pids=host_pids)
    report = asyncio.run(release(clock, processes, read).stop("m", Engine(), allocation()))
    assert report.seconds == pytest.approx(4.0) and report.readings == {0: "totals"}

    clock = Clock()
    processes = Processes(clock, {CORE: 0.5}, {})
    stuck = nvml(clock, frees_at=1e9, used=43.0, pids=host_pids)
    with pytest.raises(
        DeviceReleaseError, match=r"0\.0 of the 36\.0 GiB expected back \(device totals"
    ):
        asyncio.run(release(clock, processes, stuck, timeout=5).stop("m", Engine(), allocation()))


def test_an_engine_found_dead_is_not_waited_for_on_totals() -> None:
    """A crashed engine freed its memory before the reading: no drop will come."""
    clock = Clock()
    processes = Processes(clock, {}, {})
    read = nvml(clock, frees_at=1e9, used=2.0, pids={})
    report = asyncio.run(release(clock, processes, read).stop("m", Engine(), allocation()))
    assert report.seconds == 0.0


def test_without_nvml_only_the_processes_are_waited_for() -> None:
    clock = Clock()
    processes = Processes(clock, {CORE: 2.0}, {})
    report = asyncio.run(release(clock, processes, dict).stop("m", Engine(), allocation()))
    assert report.seconds == pytest.approx(2.0) and report.readings == {0: "unread"}


def test_an_nvml_reading_that_raises_does_not_fail_the_stop() -> None:
    clock = Clock()

    def broken() -> dict[int, DeviceUse]:
        raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    processes = Processes(clock, {CORE: 1.0}, {})
    report = asyncio.run(release(clock, processes, broken).stop("m", Engine(), allocation()))
    assert report.readings == {0: "unread"}


# -- what sleep leaves -------------------------------------------------------------------------


def test_sleep_residue_from_the_engines_pids() -> None:
    # vLLM's pool freed; context, NCCL and a cuBLAS workspace stay with the worker: 1.6 GiB.
    before = {0: DeviceUse(45.0, {CORE: 41.6, 555: 3.4})}
    after = {0: DeviceUse(5.0, {CORE: 1.6, 555: 3.4})}
    assert measure_residue(allocation(), before, after, frozenset({CORE})) == (1.6,)


def test_sleep_residue_from_device_totals_in_a_container() -> None:
    before = {0: DeviceUse(45.0, {4242: 41.6}), 1: DeviceUse(44.0, {})}
    after = {0: DeviceUse(6.0, {4242: 2.6}), 1: DeviceUse(4.5, {})}
    kept = measure_residue(allocation(devices=(0, 1)), before, after, frozenset({CORE}))
    assert kept == (pytest.approx(2.0), pytest.approx(1.5))  # 41 reserved less 39 / 39.5 freed


def test_sleep_residue_unknown_without_readings() -> None:
    assert measure_residue(allocation(), {}, {}, frozenset({CORE})) is None


def test_the_psutil_table_finds_a_real_tree_and_sees_it_go() -> None:
    """On this box's processes: a child and its grandchild (a core and its TP worker)."""
    sleeper = "import time; time.sleep(30)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
    core = subprocess.Popen([sys.executable, "-c", code + "time.sleep(30)"])
    table = PsutilProcesses()
    tree: frozenset[int] = frozenset()
    try:
        deadline = time.monotonic() + 20
        while len(tree) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            tree = table.tree([core.pid])
        assert core.pid in tree and len(tree) == 2
        core.kill()
        core.wait()
        worker = tree - {core.pid}
        assert table.alive(tree) == worker  # the orphan outlives its parent
        assert table.tree([core.pid]) == frozenset()  # and cannot be found from it any more
    finally:
        core.kill()
        for pid in table.alive(tree):
            os.kill(pid, signal.SIGKILL)
