"""Autoload models go where the start-up plan put them, whatever order their loads reach
placement in.

``HostCapacity.check_catalogue`` proves at start that the autoload models fit together when
placed in catalogue order. On a first run they all download at once and each is placed when
its download ends: in completion order, a small model done first can take the GPU the plan
gave a big one, and the big one may then fit nowhere. Making the later ones wait would hold
every cached model behind the slowest download; instead each autoload model is placed on the
devices the plan gave it (a pinned demand, same memory), so any completion order ends in the
plan. Where that no longer fits (an on-demand model took the room meanwhile), the load is
placed freely, as any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from appliance.catalogue.schema import ModelSpec, placed_here
from appliance.host.capacity import HostCapacity
from appliance.host.placement import Allocation, Demand, PlacementError


class StartupPlan:
    """The devices the start-up plan gives each autoload model; each is followed once."""

    def __init__(
        self, capacity: HostCapacity | None = None, planned: dict[str, Allocation] | None = None
    ) -> None:
        self._capacity = capacity
        self._planned = dict(planned or {})

    @classmethod
    def of(cls, capacity: HostCapacity, specs: Iterable[ModelSpec]) -> StartupPlan:
        """Plan ``specs`` (the autoload models, in catalogue order) as ``check_catalogue`` does;
        a model that does not fit has no plan (its load then reports why)."""
        planned: dict[str, Allocation] = {}
        for spec in specs:
            if not placed_here(spec):
                continue
            try:
                planned[spec.name] = capacity.place(spec, list(planned.values()))
            except PlacementError:
                continue
        return cls(capacity, planned)

    def devices(self, model: str) -> tuple[int, ...] | None:
        """Where the plan puts ``model`` (None: it has no plan, or it was followed already)."""
        found = self._planned.get(model)
        return found.devices if found is not None else None

    def follow(self, demand: Demand, beside: Sequence[Allocation]) -> Demand:
        """``demand`` pinned to its planned devices, when it still fits there beside
        ``beside``; else ``demand`` as it is. Only the first load of a model follows the plan."""
        planned = self._planned.pop(demand.model, None)
        if planned is None or self._capacity is None or demand.devices is not None:
            return demand
        pinned = Demand(
            model=demand.model,
            tensor_parallel_size=demand.tensor_parallel_size,
            memory_gib=demand.memory_gib,
            memory_share=demand.memory_share,
            devices=planned.devices,
        )
        try:
            self._capacity.place_demand(pinned, beside)
        except PlacementError:
            return demand
        return pinned
