"""The host's room for engines, as the supervisor consults it.

It turns catalogue entries into demands, plans where they go (and what to evict), refuses a
catalogue that could never be placed, checks the devices' real free memory before a start,
holds the per-device locks, and keeps the host-memory budget of level-1 sleepers. Pure
placement arithmetic lives in ``placement``; this module binds it to one host's inventory,
policy and memory readings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.errors import ConfigError, LifecycleError
from appliance.host.device_locks import DeviceLocks
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
    ) -> None:
        """``default_share`` is the GPU share of a model that declares no memory,
        ``cpu_default_gib`` its CPU memory; ``free_memory`` reads each GPU's free GiB now
        (NVML); ``sleep_host_budget_gib`` is the host RAM level-1 sleepers may fill."""
        self.inventory = inventory
        self.policy = policy or PlacementPolicy()
        self.locks = DeviceLocks(inventory)
        self._default_share = default_share
        self._cpu_default_gib = cpu_default_gib
        self._free_memory = free_memory
        self._sleep_host_budget_gib = sleep_host_budget_gib

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
        )

    def check_catalogue(self, specs: Iterable[ModelSpec]) -> None:
        """Refuse, before any engine starts, a catalogue whose placement vLLM would reject.

        Every local model must fit on this host when it is empty, and the autoload models
        must fit together (in catalogue order, as they will be placed).

        Raises:
            ConfigError: one line naming the model, what it needs and what is free.
        """
        local = [spec for spec in specs if isinstance(spec, LocalModelSpec)]
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

    def _place(self, spec: ModelSpec, beside: Sequence[Allocation]) -> Allocation:
        return place(
            self.demand(spec),
            self.inventory,
            beside,
            default_share=self._default_share,
            policy=self.policy,
        )
