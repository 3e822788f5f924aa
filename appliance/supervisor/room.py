"""Room for a model: where it would go, and which models would sleep or be evicted for it.

Planning only: ``Room`` reads the handles, the host's capacity and the supervisor's limits
and changes nothing (no awaits, no state changes); the supervisor carries a plan out.
Sleeping comes before evicting (a wake is about a second, a reload tens of seconds), and a
model stays loaded ``min_resident_seconds`` before it may be evicted for another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.base import Engine, weights_of
from appliance.errors import EvictionTooSoonError
from appliance.host.capacity import HostCapacity
from appliance.host.inventory import DeviceKind, Inventory
from appliance.host.placement import Allocation, Demand, PlacementError
from appliance.host.residency import LoadPlan, Sleeper
from appliance.supervisor.handle import ModelHandle, SupervisorLimits
from appliance.supervisor.states import ModelState

S = ModelState


class Room:
    """Plans placement over the table ``models`` (read live); see the module docstring."""

    def __init__(
        self,
        models: Mapping[str, ModelHandle],
        capacity: HostCapacity,
        inventory: Inventory,
        limits: SupervisorLimits,
        last_used: Callable[[ModelHandle], float],
    ) -> None:
        """``last_used`` is when a model was last used in any HTTP process (LRU order)."""
        self._models = models
        self._capacity = capacity
        self._inventory = inventory
        self._limits = limits
        self._last_used = last_used

    def allocations(self, excluding: str) -> list[Allocation]:
        """What every model but ``excluding`` holds on the devices now."""
        return [
            h.allocation
            for h in self._models.values()
            if h.allocation is not None and h.name != excluding
        ]

    def plan(self, handle: ModelHandle, demand: Demand) -> tuple[Allocation, list[str]]:
        """Where ``demand`` would go now, and what would be evicted for it; changes nothing.

        Ready and sleeping evictable models may be evicted, once they have been resident for
        ``min_resident_seconds``. When only younger ones stand in the way, the answer is a 503
        with Retry-After for when they may go, not a 507: the model will fit then.
        """
        now = time.monotonic()
        minimum = self._limits.min_resident_seconds
        candidates = [
            h
            for h in self._models.values()
            if h.local is not None
            and h.local.evictable
            and h.state in (S.READY, S.SLEEPING)
            and h.name != handle.name
        ]
        allocations = self.allocations(handle.name)
        settled = {h.name: self._last_used(h) for h in candidates if now - h.ready_since >= minimum}
        try:
            return self._capacity.plan(demand, allocations, settled)
        except PlacementError:
            if len(settled) == len(candidates):
                raise
            # Raises PlacementError again when even evicting the young ones would not help.
            _, victims = self._capacity.plan(
                demand, allocations, {h.name: self._last_used(h) for h in candidates}
            )
        young = {h.name: h for h in candidates if h.name not in settled}
        waits = [minimum - (now - young[v].ready_since) for v in victims if v in young]
        wait = max(1.0, *waits)
        names = ", ".join(repr(v) for v in sorted(victims) if v in young)
        raise EvictionTooSoonError(
            f"model {handle.name!r} needs the room of {names}, loaded less than "
            f"{minimum:g}s ago (models stay loaded that long before they can be "
            f"evicted); retry in {wait:.0f}s",
            retry_after=wait,
        )

    def plan_sleep(
        self, handle: ModelHandle, demand: Demand
    ) -> tuple[Allocation, list[str]] | None:
        """Room for ``demand`` by sleeping ready evictable models with sleep mode (GPU only),
        within the host's sleep budget; None when that cannot make it. Changes nothing."""
        if self._inventory.kind is not DeviceKind.GPU:
            return None
        now = time.monotonic()
        sleepers = [
            Sleeper(
                name=h.name,
                host_gib=self.weights_gib(h),
                wake_seconds=h.wake_seconds,
                last_used=self._last_used(h),
            )
            for h in self._models.values()
            if h.local is not None
            and h.local.evictable
            and h.local.engine.get("enable_sleep_mode")
            and h.state is S.READY
            and h.engine is not None
            and h.name != handle.name
            and now - h.ready_since >= self._limits.min_resident_seconds
        ]
        if not sleepers:
            return None
        return self._capacity.plan_sleep(
            demand, self.allocations(handle.name), sleepers, self._host_gib_asleep()
        )

    @staticmethod
    def weights_gib(handle: ModelHandle) -> float:
        """What a level-1 sleep of ``handle`` puts in host RAM: its weights, else what it
        holds on all its GPUs (each tensor-parallel rank pins its own shard, as
        ``host_gib_for_sleep`` counts; one GPU's share would under-count by the TP size)."""
        weights = weights_of(handle.engine)
        if weights is not None:
            return weights
        return sum(handle.allocation.reserved_gib) if handle.allocation is not None else 0.0

    def plan_load(self, handle: ModelHandle, spec: LocalModelSpec) -> LoadPlan:
        """Where ``handle`` would go if loaded now, which models would sleep and which would be
        evicted for it: a dry run (`appliance models plan`) that changes nothing. A model that
        holds devices already (loading, ready, sleeping, draining) answers with its own
        allocation."""
        if handle.allocation is not None:
            return LoadPlan(handle.allocation, sleep=[], evict=[])
        demand = self._capacity.demand(spec)
        asleep = self.plan_sleep(handle, demand)
        if asleep is not None:
            return LoadPlan(asleep[0], sleep=asleep[1], evict=[])
        allocation, evicted = self.plan(handle, demand)
        return LoadPlan(allocation, sleep=[], evict=evicted)

    def host_gib_for_sleep(self, handle: ModelHandle, engine: Engine, level: int) -> float:
        """Host memory a sleep at ``level`` would fill; refuse when the budget lacks it."""
        if level != 1:
            return 0.0  # level 2 discards the weights
        assert handle.allocation is not None
        weights = weights_of(engine)
        need = weights if weights is not None else sum(handle.allocation.reserved_gib)
        self._capacity.check_host_room(handle.name, need, self._host_gib_asleep())
        return need

    def _host_gib_asleep(self) -> float:
        """Host memory the weights of the models asleep now fill."""
        return sum(h.host_gib for h in self._models.values() if h.state is S.SLEEPING)
