"""One lock per device around the engine changes that move its memory.

vLLM sizes an engine's KV cache from the device-wide change in free memory it sees while it
profiles at start (``determine_available_memory`` in ``vllm/v1/worker/gpu_worker.py``), and
assumes no other process changes that device's memory meanwhile. So on a GPU, starting,
stopping, putting to sleep and waking the engines that share it happen one at a time; engines
on disjoint GPUs still change in parallel. On the CPU there is no such profiling: only starts
are serialised there, as vLLM's CPU engines each read their own KV-cache size at spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Iterable

from appliance.host.inventory import DeviceKind, Inventory


class DeviceChange(str, enum.Enum):
    """What an engine is doing to its devices' memory."""

    START = "start"  # vLLM allocates weights, profiles, then takes its KV cache
    STOP = "stop"  # the engine's processes exit and free everything
    SLEEP = "sleep"  # vLLM's sleep mode frees weights (level 2) or moves them to the host
    WAKE = "wake"  # the reverse of sleep


class DeviceLocks:
    """The per-device locks of one inventory; see the module docstring."""

    def __init__(self, inventory: Inventory) -> None:
        self._kind = inventory.kind
        self._locks = {d.index: asyncio.Lock() for d in inventory.devices}

    @contextlib.asynccontextmanager
    async def hold(self, devices: Iterable[int], change: DeviceChange) -> AsyncIterator[None]:
        """Hold the locks of ``devices`` while ``change`` runs.

        Locks are always taken in device order, so two changes over overlapping device sets
        cannot each hold one lock and wait for the other's.
        """
        if self._kind is not DeviceKind.GPU and change is not DeviceChange.START:
            yield
            return
        locks = [self._locks[i] for i in sorted(set(devices)) if i in self._locks]
        taken: list[asyncio.Lock] = []
        try:
            for lock in locks:
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()

    def busy(self, index: int) -> bool:
        """Whether a change on device ``index`` runs now."""
        lock = self._locks.get(index)
        return lock is not None and lock.locked()
