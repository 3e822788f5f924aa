"""The host's room for engines, as the supervisor consults it.

It turns catalogue entries into demands, plans where they go (and what to evict), refuses a
catalogue that could never be placed, checks the devices' real free memory before a start,
holds the per-device locks, and keeps the host-memory budget of level-1 sleepers. Pure
placement arithmetic lives in ``placement``; this module binds it to one host's inventory,
policy and memory readings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from appliance.catalogue.schema import ModelSpec, placed_here
from appliance.errors import ConfigError, LifecycleError
from appliance.host.device_locks import DeviceLocks
from appliance.host.device_release import DeviceRelease, Stoppable, engine_tree
from appliance.host.inventory import DeviceKind, Inventory
from appliance.host.placement import (
    Allocation,
    Demand,
    PlacementError,
    PlacementPolicy,
    check_free,
    place,
    plan_eviction,
)
from appliance.host.residency import Sleeper, plan_sleep
from appliance.host.sleep_residue import measure_residue

log = logging.getLogger(__name__)


class HostCapacity:
    """One host's devices, the placement rules for them, and their locks."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        policy: PlacementPolicy | None = None,
        default_share: float = 0.9,
        cpu_default_gib: float = 2.0,
        free_memory: Callable[[], Mapping[int, float]] | None = None,
        sleep_host_budget_gib: float = math.inf,
        release: DeviceRelease | None = None,
    ) -> None:
        """``default_share`` is the GPU share of a model that declares no memory,
        ``cpu_default_gib`` its CPU memory; ``free_memory`` reads each GPU's free GiB now
        (NVML); ``sleep_host_budget_gib`` is the host RAM level-1 sleepers may fill;
        ``release`` waits after a stop for the engine's processes and GPU memory to go, and
        measures what a sleep leaves (None: a stop ends when the engine says so)."""
        self.inventory = inventory
        self.policy = policy or PlacementPolicy()
        self.locks = DeviceLocks(inventory)
        self._default_share = default_share
        self._cpu_default_gib = cpu_default_gib
        self._free_memory = free_memory
        self._sleep_host_budget_gib = sleep_host_budget_gib
        self.release = release
        # Model -> (devices, GiB its last sleep left on each), measured by ``sleep``.
        self._kept: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}

    def demand(self, spec: ModelSpec) -> Demand:
        """What ``spec`` asks of this host (a CPU model without memory gets the CPU default)."""
        demand = Demand.from_spec(spec)
        no_memory = demand.memory_gib is None and demand.memory_share is None
        if self.inventory.kind is DeviceKind.CPU and no_memory:
            demand = Demand(
                model=demand.model,
                tensor_parallel_size=demand.tensor_parallel_size,
                memory_gib=self._cpu_default_gib,
                memory_share=None,
                devices=demand.devices,
            )
        return demand

    def plan(
        self,
        demand: Demand,
        allocations: Sequence[Allocation],
        evictable: Mapping[str, float],
    ) -> tuple[Allocation, list[str]]:
        """Where ``demand`` goes beside ``allocations``, and which evictable models must go."""
        return plan_eviction(
            demand,
            self.inventory,
            allocations,
            evictable,
            default_share=self._default_share,
            policy=self.policy,
        )

    def plan_sleep(
        self,
        demand: Demand,
        allocations: Sequence[Allocation],
        sleepers: Sequence[Sleeper],
        host_used_gib: float,
    ) -> tuple[Allocation, list[str]] | None:
        """Room for ``demand`` by sleeping some ``sleepers`` within the host's sleep budget
        (``host_used_gib`` of it taken already); None when sleeping cannot make it."""
        return plan_sleep(
            demand,
            self.inventory,
            allocations,
            sleepers,
            self._sleep_host_budget_gib - host_used_gib,
            default_share=self._default_share,
            policy=self.policy,
            kept_gib=self._kept_for(allocations),
        )

    def check_catalogue(self, specs: Iterable[ModelSpec]) -> None:
        """Refuse, before any engine starts, a catalogue whose placement vLLM would reject.

        Every local model must fit on this host when it is empty, and the autoload models
        must fit together (in catalogue order, as they will be placed).

        Raises:
            ConfigError: one line naming the model, what it needs and what is free.
        """
        local = [spec for spec in specs if placed_here(spec)]
        for spec in local:
            try:
                self._place(spec, [])
            except PlacementError as exc:
                raise ConfigError(f"{exc.message} (even with nothing else loaded)") from None
        placed: list[Allocation] = []
        for spec in (spec for spec in local if spec.autoload):
            try:
                placed.append(self._place(spec, placed))
            except PlacementError as exc:
                beside = ", ".join(a.model for a in placed)
                raise ConfigError(
                    f"the autoload models do not fit together: {exc.message} (beside {beside}); "
                    "set autoload: false on some, or give them less memory"
                ) from None

    def check_free(self, allocation: Allocation | None) -> None:
        """Refuse, as vLLM would at start, when a GPU lacks the free memory placed for it."""
        if allocation is None or self._free_memory is None:
            return
        if self.inventory.kind is not DeviceKind.GPU:
            return
        check_free(allocation, self.inventory, self._free_memory())

    def check_host_room(self, model: str, need_gib: float, used_gib: float) -> None:
        """Refuse a level-1 sleep whose weights would overfill the host's sleep budget."""
        budget = self._sleep_host_budget_gib
        if used_gib + need_gib > budget + 1e-6:
            raise LifecycleError(
                f"model {model!r} cannot sleep at level 1: its weights ({need_gib:.1f} GiB) "
                f"would not fit in the host memory left for sleeping models "
                f"({max(budget - used_gib, 0):.1f} of {budget:.1f} GiB); use level 2 or "
                "unload another"
            )

    async def stop(self, model: str, engine: Stoppable, allocation: Allocation | None) -> None:
        """Stop ``engine``; on a GPU, return only once its process tree and memory are gone.

        Raises:
            DeviceReleaseError: they were not gone in time (see ``device_release``).
        """
        if self.release is None or allocation is None or self.inventory.kind is not DeviceKind.GPU:
            await engine.stop()
            return
        await self.release.stop(model, engine, allocation)

    async def sleep(self, model: str, engine: Any, allocation: Allocation, level: int) -> None:
        """Put ``engine`` to sleep, measuring what it leaves on its GPUs (``sleep_residue``)."""
        if self.release is None or self.inventory.kind is not DeviceKind.GPU:
            await engine.sleep(level)
            return
        pids = engine_tree(engine, self.release.processes)
        before = self.release.read()
        await engine.sleep(level)
        kept = measure_residue(allocation, before, self.release.read(), pids)
        if kept is not None:
            self._kept[model] = (allocation.devices, kept)
            log.info(
                "model %s: asleep at level %d, still holds %s",
                model,
                level,
                ", ".join(
                    f"gpu{i} {g:.2f} GiB" for i, g in zip(allocation.devices, kept, strict=True)
                ),
            )

    def asleep(self, allocation: Allocation) -> Allocation:
        """``allocation`` asleep: what its last sleep was measured to keep, else the headroom."""
        return allocation.sleeping(self._kept_on(allocation.model, allocation.devices))

    def kept_gib(self, model: str) -> tuple[float, ...] | None:
        """What ``model``'s last sleep left on its devices, when measured."""
        found = self._kept.get(model)
        return found[1] if found is not None else None

    def _kept_for(self, allocations: Sequence[Allocation]) -> dict[str, tuple[float, ...]]:
        found = {a.model: self._kept_on(a.model, a.devices) for a in allocations}
        return {model: kept for model, kept in found.items() if kept is not None}

    def _kept_on(self, model: str, devices: tuple[int, ...]) -> tuple[float, ...] | None:
        found = self._kept.get(model)
        if found is None:
            return None
        measured_on, kept = found
        # Reloaded elsewhere since: the same engine keeps about the same on any of its GPUs.
        return kept if measured_on == devices else (max(kept),) * len(devices)

    def place_demand(self, demand: Demand, beside: Sequence[Allocation]) -> Allocation:
        """Where ``demand`` would go beside ``beside`` (changes nothing).

        Raises:
            PlacementError: it does not fit there.
        """
        return place(
            demand,
            self.inventory,
            beside,
            default_share=self._default_share,
            policy=self.policy,
        )

    def place(self, spec: ModelSpec, beside: Sequence[Allocation]) -> Allocation:
        """Where ``spec`` would go beside ``beside`` (no eviction, no sleep; changes nothing).

        Raises:
            PlacementError: it does not fit there.
        """
        return self._place(spec, beside)

    def _place(self, spec: ModelSpec, beside: Sequence[Allocation]) -> Allocation:
        return place(
            self.demand(spec),
            self.inventory,
            beside,
            default_share=self._default_share,
            policy=self.policy,
        )
