"""Residency tiers: make room by putting models to sleep before unloading any (pure).

A model asleep at level 1 keeps its engine and moves its weights to host RAM: it comes back in
about a second, where an unloaded one reloads in tens of seconds. So when a load needs room,
first try to find it by sleeping evictable models that can sleep, cheapest to wake first,
while their weights fit the host's sleep budget; only when sleeping cannot make room does the
caller fall back to unloading (``placement.plan_eviction``). Asleep, a model still holds its
CUDA context and whatever else vLLM's sleep leaves (measured: ``sleep_residue``) on its
devices (``Allocation.sleeping``), which the placement here accounts for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from appliance.host.inventory import Inventory
from appliance.host.placement import (
    Allocation,
    Demand,
    PlacementError,
    PlacementPolicy,
    place,
)


@dataclass(frozen=True)
class LoadPlan:
    """What a load would do now: where it goes, which models sleep, which are unloaded."""

    allocation: Allocation
    sleep: list[str]
    evict: list[str]


@dataclass(frozen=True)
class Sleeper:
    """A ready, evictable model that could sleep at level 1 to make room."""

    name: str
    host_gib: float  # its weights, what a level-1 sleep puts in host RAM
    wake_seconds: float | None  # its last measured wake (None: never woken yet)
    last_used: float  # monotonic time of its last request


def _wake_cost(sleeper: Sleeper) -> tuple[float, float, str]:
    # Cheapest to bring back first (a model never woken costs about its weights' size, a
    # second per few GiB), then least recently used, then by name for a deterministic plan.
    cost = sleeper.wake_seconds if sleeper.wake_seconds is not None else sleeper.host_gib / 4
    return (cost, sleeper.last_used, sleeper.name)


def plan_sleep(
    demand: Demand,
    inventory: Inventory,
    allocations: Sequence[Allocation],
    sleepers: Sequence[Sleeper],
    host_free_gib: float,
    *,
    default_share: float,
    policy: PlacementPolicy = PlacementPolicy(),
    kept_gib: Mapping[str, Sequence[float]] | None = None,
) -> tuple[Allocation, list[str]] | None:
    """Room for ``demand`` by sleeping some of ``sleepers``; None when sleeping cannot make it.

    Returns the allocation and the models to put to sleep (as few as needed, cheapest to wake
    first); an empty list when ``demand`` fits as things are. The sleepers' weights together
    stay within ``host_free_gib``. ``kept_gib`` is what each model's sleep was measured to
    leave on its devices (``sleep_residue``); a model never measured keeps its headroom.
    """
    kept = kept_gib or {}
    by_name = {a.model: a for a in allocations}

    def fits_with_asleep(asleep: set[str]) -> Allocation | None:
        beside = [
            by_name[n].sleeping(kept.get(n)) if n in asleep else a for n, a in by_name.items()
        ]
        try:
            return place(demand, inventory, beside, default_share=default_share, policy=policy)
        except PlacementError:
            return None

    placed = fits_with_asleep(set())
    if placed is not None:
        return placed, []
    order = sorted(
        (s for s in sleepers if s.name in by_name and not by_name[s.name].asleep),
        key=_wake_cost,
    )
    chosen: list[Sleeper] = []
    host_used = 0.0
    for sleeper in order:
        if host_used + sleeper.host_gib > host_free_gib + 1e-6:
            continue  # its weights would overfill the host budget; a smaller one may fit
        chosen.append(sleeper)
        host_used += sleeper.host_gib
        if fits_with_asleep({s.name for s in chosen}) is not None:
            break
    else:
        return None
    # Spare again any whose sleep turned out not to help, dearest to wake first.
    for sleeper in sorted(chosen[:-1], key=_wake_cost, reverse=True):
        rest = {s.name for s in chosen} - {sleeper.name}
        if fits_with_asleep(rest) is not None:
            chosen.remove(sleeper)
    names = {s.name for s in chosen}
    allocation = fits_with_asleep(names)
    assert allocation is not None  # only sets that fit are kept
    return allocation, [s.name for s in sorted(chosen, key=_wake_cost)]
