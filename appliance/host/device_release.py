"""Stop an engine, then wait until its GPUs really have their memory back.

vLLM's shutdown returns before the device is free: ``shutdown`` in ``vllm/v1/utils.py`` gives
the engine core 5 s after SIGTERM, then kills it; tensor-parallel workers leave later, when
they see their death pipe close (``multiproc_executor.py``); and the driver frees a process's
memory only after it exits. A start on that GPU meanwhile fails the free-memory check, or
vLLM's own profiling assertion (``gpu_worker.py``), on memory that is about to come back. So a
stop holds its devices' locks until:

1. every process of the engine's tree is gone. The tree (engine cores and all their
   descendants: TP workers, compile workers) is collected *before* the stop: once the core has
   exited its orphans are re-parented and can no longer be found from it;
2. the devices' memory is back, read through NVML. Where NVML lists the tree's pids, none may
   be listed any more. Inside a container NVML lists *host* pids, which match none of ours;
   then only device totals can tell: the device's used memory must fall by
   ``RELEASE_FRACTION`` of the share the engine held there (its CUDA context, an estimate in
   placement, is not waited for). Which reading decided is logged.

Past ``timeout_seconds`` the wait gives up with :class:`DeviceReleaseError`, naming what is
still there (the lock is then released: the next start's free-memory check refuses on real
numbers rather than waiting for ever). Clock, sleep, process table and NVML reader are
injected, so every decision here is unit-tested without a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from appliance.errors import DeviceReleaseError
from appliance.host.inventory import DeviceUse
from appliance.host.placement import Allocation

log = logging.getLogger(__name__)

# Of the share an engine held on a device, what must come back when only totals can be read:
# vLLM fills its share with weights and KV cache, but a reading may catch another engine's
# allocator growing a little meanwhile.
RELEASE_FRACTION = 0.9


DeviceReader = Callable[[], Mapping[int, DeviceUse]]


class ProcessTable(Protocol):
    """The host's processes, as far as a stop needs them."""

    def tree(self, pids: Iterable[int]) -> frozenset[int]:
        """``pids`` and every live descendant of them."""
        ...

    def alive(self, pids: Iterable[int]) -> frozenset[int]:
        """Those of ``pids`` still running (a zombie counts as gone: it holds no memory)."""
        ...


@runtime_checkable
class HasProcesses(Protocol):
    """An engine that can name the processes it started."""

    def process_ids(self) -> tuple[int, ...]:
        """Its engine-core processes' pids (none when it started none)."""
        ...


class Stoppable(Protocol):
    """What a stop needs of an engine."""

    async def stop(self) -> None:
        """Shut the engine's processes down."""
        ...


class PsutilProcesses:
    """:class:`ProcessTable` over psutil."""

    def tree(self, pids: Iterable[int]) -> frozenset[int]:
        """``pids`` and their descendants, those still alive."""
        import psutil

        found: set[int] = set()
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                found.add(pid)
                found.update(child.pid for child in proc.children(recursive=True))
            except psutil.Error:
                continue
        return self.alive(found)

    def alive(self, pids: Iterable[int]) -> frozenset[int]:
        """Those of ``pids`` running now (zombies and vanished ones left out)."""
        import psutil

        live: set[int] = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    live.add(pid)
            except psutil.Error:
                continue
        return frozenset(live)


def engine_tree(engine: object, processes: ProcessTable) -> frozenset[int]:
    """The engine's whole process tree now (empty for an engine that names no processes)."""
    if not isinstance(engine, HasProcesses):
        return frozenset()
    return processes.tree(engine.process_ids())


@dataclass(frozen=True)
class StopSnapshot:
    """What a stop is to wait for, read before the stop began."""

    model: str
    pids: frozenset[int]  # the engine's whole tree
    devices: tuple[int, ...]
    used_before: Mapping[int, float]  # device -> used GiB before the stop
    expected_gib: Mapping[int, float]  # device -> GiB to come back, when only totals tell
    listed: Mapping[int, frozenset[int]]  # device -> the tree's pids NVML listed there


@dataclass(frozen=True)
class ReleaseReport:
    """How a stop's release ended: how long it took, and which reading decided per device."""

    seconds: float
    readings: Mapping[int, str]  # device -> "pids" or "totals" or "unread"


class DeviceRelease:
    """Waits, after a stop, for the engine's processes and memory to be gone."""

    def __init__(
        self,
        read_devices: DeviceReader,
        processes: ProcessTable,
        *,
        timeout_seconds: float = 60.0,
        poll_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._read = read_devices
        self.processes = processes
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        self._clock = clock
        self._sleep = sleep

    def read(self) -> Mapping[int, DeviceUse]:
        """The devices now; empty when NVML cannot be read (never raises)."""
        try:
            return self._read()
        except Exception as exc:  # a reading lost is a check skipped, not a stop failed
            log.warning("device memory cannot be read: %s", exc)
            return {}

    def snapshot(self, model: str, engine: object, allocation: Allocation) -> StopSnapshot:
        """Collect the engine's tree and the devices' memory, before the stop."""
        pids = engine_tree(engine, self.processes)
        now = self.read()
        used: dict[int, float] = {}
        expected: dict[int, float] = {}
        listed: dict[int, frozenset[int]] = {}
        for index in allocation.devices:
            use = now.get(index)
            if use is None:
                continue
            used[index] = use.used_gib
            listed[index] = frozenset(use.processes) & pids
            share = max(allocation.reserved_on(index) - allocation.headroom_gib, 0.0)
            # An engine found already dead freed what it had before this reading.
            expected[index] = share * RELEASE_FRACTION if pids else 0.0
        return StopSnapshot(model, pids, allocation.devices, used, expected, listed)

    async def stop(self, model: str, engine: Stoppable, allocation: Allocation) -> ReleaseReport:
        """Stop ``engine``, then wait for its tree and its devices' memory (see the module).

        Raises:
            DeviceReleaseError: something is still there after ``timeout_seconds``.
        """
        snapshot = self.snapshot(model, engine, allocation)
        await engine.stop()
        return await self.wait(snapshot)

    async def wait(self, snapshot: StopSnapshot) -> ReleaseReport:
        """Poll until ``snapshot``'s processes are gone and its memory is back.

        Raises:
            DeviceReleaseError: naming the processes or devices still holding on.
        """
        started = self._clock()
        while True:
            left = self.processes.alive(snapshot.pids)
            held = self._held(snapshot, self.read()) if not left else {}
            if not left and not held:
                report = ReleaseReport(self._clock() - started, self._how(snapshot))
                log.info(
                    "model %s: processes gone and device memory back in %.1fs (%s)",
                    snapshot.model,
                    report.seconds,
                    ", ".join(f"gpu{i}: {how}" for i, how in report.readings.items()) or "no GPU",
                )
                return report
            if self._clock() - started >= self._timeout:
                raise DeviceReleaseError(_timeout_message(snapshot, left, held, self._timeout))
            await self._sleep(self._poll)

    @staticmethod
    def _how(snapshot: StopSnapshot) -> dict[int, str]:
        return {
            i: (
                "unread"
                if i not in snapshot.used_before
                else "pids"
                if snapshot.listed[i]
                else "totals"
            )
            for i in snapshot.devices
        }

    @staticmethod
    def _held(snapshot: StopSnapshot, now: Mapping[int, DeviceUse]) -> dict[int, str]:
        """Device -> what it still holds of the engine; empty once all came back."""
        held: dict[int, str] = {}
        for index in snapshot.devices:
            use = now.get(index)
            if use is None or index not in snapshot.used_before:
                continue  # NVML cannot say; the processes' exit is all there is to go by
            if snapshot.listed[index]:
                still = frozenset(use.processes) & snapshot.listed[index]
                if still:
                    held[index] = f"NVML still lists pid(s) {sorted(still)}"
                continue
            freed = snapshot.used_before[index] - use.used_gib
            if freed + 1e-6 < snapshot.expected_gib[index]:
                held[index] = (
                    f"{freed:.1f} of the {snapshot.expected_gib[index]:.1f} GiB expected back "
                    f"(device totals: NVML lists none of the engine's pids, as in a container)"
                )
        return held


def _timeout_message(
    snapshot: StopSnapshot, left: frozenset[int], held: Mapping[int, str], timeout: float
) -> str:
    what = (
        f"process(es) {sorted(left)} of its engine still running"
        if left
        else "; ".join(f"gpu{i}: {detail}" for i, detail in held.items())
    )
    return (
        f"model {snapshot.model}: {timeout:.0f}s after its engine was stopped, {what}; its "
        "devices are handed on anyway, and a start there is refused while the memory is held "
        "(see `nvidia-smi`)"
    )
