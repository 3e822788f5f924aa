"""Where a model's engine goes: which devices, and how much memory on each.

Pure functions over an :class:`Inventory` and the allocations already made; no I/O. The
accounting follows what vLLM will actually take: an engine started with
``gpu_memory_utilization=u`` claims ``u x total`` on every device it spans, so an allocation
reserves exactly that on each of its devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from appliance.catalogue.schema import ModelSpec
from appliance.errors import InsufficientResourcesError
from appliance.supervisor.inventory import Device, Inventory

# Float slack, so that three models of 0.3 each still fit on a device whose share sums to 0.9.
_EPSILON_GIB = 1e-6


@dataclass(frozen=True)
class Demand:
    """What one model asks of the host (from its catalogue entry's ``resources``)."""

    model: str
    tensor_parallel_size: int = 1
    memory_gib: float | None = None  # per device; wins over memory_share
    memory_share: float | None = None  # of each device's total
    devices: tuple[int, ...] | None = None  # pinned device indices, exactly these

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"model {self.model}: tensor_parallel_size must be 1 or more")
        if self.devices is not None and len(self.devices) != self.tensor_parallel_size:
            raise ValueError(
                f"model {self.model}: pins {len(self.devices)} device(s) "
                f"but tensor_parallel_size is {self.tensor_parallel_size}"
            )

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Demand:
        """The demand of a catalogue entry."""
        res = spec.resources
        return cls(
            model=spec.name,
            tensor_parallel_size=res.tensor_parallel_size,
            memory_gib=res.memory_gib,
            memory_share=res.memory_share,
            devices=tuple(res.devices) if res.devices is not None else None,
        )


@dataclass(frozen=True)
class Allocation:
    """Devices given to one model, and the memory reserved for it on each."""

    model: str
    devices: tuple[int, ...]
    memory_share: float  # what to hand vLLM as gpu_memory_utilization
    reserved_gib: tuple[float, ...]  # per device, in the order of ``devices``

    def __post_init__(self) -> None:
        if not self.devices or len(self.devices) != len(self.reserved_gib):
            raise ValueError(f"model {self.model}: one reservation per device, at least one")

    @property
    def memory_gib(self) -> float:
        """Memory reserved per device (the largest, if devices of different sizes differ)."""
        return max(self.reserved_gib)

    def reserved_on(self, index: int) -> float:
        """GiB this allocation holds on device ``index`` (0 when it does not use it)."""
        return sum(
            gib for d, gib in zip(self.devices, self.reserved_gib, strict=True) if d == index
        )

    def share_of(self, device: Device) -> float:
        """The fraction of ``device``'s memory this allocation holds there."""
        return self.reserved_on(device.index) / device.total_gib


class PlacementError(InsufficientResourcesError):
    """A model does not fit: the message says what it needs and what each device has free."""


def place(
    demand: Demand,
    inventory: Inventory,
    allocations: Sequence[Allocation],
    *,
    default_share: float,
) -> Allocation:
    """Choose devices for ``demand`` beside the existing ``allocations``.

    Memory per device is ``memory_gib``, else ``memory_share`` of the device's total, else
    ``default_share`` of it. Models share a device while their reservations sum to at most its
    total; a tensor-parallel model gets that many distinct devices; pins are honoured exactly.
    Among the candidates the one reserving least in all wins (it differs only when a
    tensor-parallel model could span cards of unequal size), then the best fit (least memory
    left over, keeping big holes for big models), then the lowest indices, so the same inputs
    always give the same answer.

    Raises:
        PlacementError: the model does not fit, or is pinned to a device the host lacks.
        ValueError: ``allocations`` already holds ``demand.model`` (a caller bug).
    """
    if any(a.model == demand.model for a in allocations):
        raise ValueError(f"model {demand.model} is already placed")
    free = _free_gib(inventory, allocations)
    if demand.devices is not None:
        candidates = _pinned_candidates(demand, inventory)
    else:
        candidates = _candidate_sets(demand, inventory, free, default_share)
    best: tuple[tuple[float, float, tuple[int, ...]], Allocation] | None = None
    for chosen in candidates:
        allocation = _allocate(demand, chosen, default_share)
        left = [free[d.index] - gib for d, gib in zip(chosen, allocation.reserved_gib, strict=True)]
        if min(left) < -_EPSILON_GIB:
            continue
        # Least reserved in all first: on devices of unequal size one share over-reserves on
        # the bigger ones, memory no model can use. Then the best fit, then the lowest indices.
        key = (sum(allocation.reserved_gib), sum(left), allocation.devices)
        if best is None or key < best[0]:
            best = (key, allocation)
    if best is None:
        raise PlacementError(_no_room_message(demand, inventory, free, default_share))
    return best[1]


def plan_eviction(
    demand: Demand,
    inventory: Inventory,
    allocations: Sequence[Allocation],
    evictable: Mapping[str, float],
    *,
    default_share: float,
) -> tuple[Allocation, list[str]]:
    """Place ``demand``, evicting evictable models least recently used first if it must.

    ``evictable`` maps model name to its last use (monotonic time). Evicts as few as needed:
    least recently used first until the model fits, then any of those whose eviction turned out
    not to help (it sat on another device, say) is spared again, most recently used first.
    Returns the allocation and the names to evict, least recently used first.

    Raises:
        PlacementError: the model does not fit even with every evictable model gone; nothing
            is to be evicted then.
    """
    if demand.devices is not None:
        _pinned_candidates(demand, inventory)  # a pin to no device: no eviction can help
    try:
        return place(demand, inventory, allocations, default_share=default_share), []
    except PlacementError as exc:
        first_error = exc
    placed = {a.model for a in allocations}
    # Ties in last use broken by name, so the plan is deterministic.
    order = sorted(
        (name for name in evictable if name in placed and name != demand.model),
        key=lambda name: (evictable[name], name),
    )

    def fits_without(evicted: set[str]) -> Allocation | None:
        kept = [a for a in allocations if a.model not in evicted]
        try:
            return place(demand, inventory, kept, default_share=default_share)
        except PlacementError:
            return None

    evicted: list[str] = []
    for name in order:
        evicted.append(name)
        if fits_without(set(evicted)) is not None:
            break
    else:
        names = ", ".join(order) if order else "none"
        raise PlacementError(
            f"{first_error.message}; evicting every evictable model ({names}) would not make room"
        )
    for name in reversed(evicted[:-1]):
        if fits_without(set(evicted) - {name}) is not None:
            evicted.remove(name)
    allocation = fits_without(set(evicted))
    assert allocation is not None  # the loop above only keeps sets that fit
    return allocation, evicted


def _free_gib(inventory: Inventory, allocations: Sequence[Allocation]) -> dict[int, float]:
    """Free GiB per device index: total minus what the allocations reserve there."""
    return {
        d.index: d.total_gib - sum(a.reserved_on(d.index) for a in allocations)
        for d in inventory.devices
    }


def _pinned_candidates(demand: Demand, inventory: Inventory) -> list[tuple[Device, ...]]:
    """The one candidate a pinned demand has; an error when a pin names no device."""
    assert demand.devices is not None
    by_index = {d.index: d for d in inventory.devices}
    missing = [i for i in demand.devices if i not in by_index]
    if missing:
        kind = inventory.kind.value
        raise PlacementError(
            f"model {demand.model} is pinned to {', '.join(f'{kind}{i}' for i in missing)}, "
            f"which this host does not have; devices: {inventory.describe()}"
        )
    return [tuple(by_index[i] for i in demand.devices)]


def _candidate_sets(
    demand: Demand, inventory: Inventory, free: Mapping[int, float], default_share: float
) -> list[tuple[Device, ...]]:
    """Device sets worth trying for an unpinned demand, at most one per distinct device size.

    For each size ``s`` the set is the ``tensor_parallel_size`` tightest-fitting devices of at
    least size ``s`` (the share, and so the reservation, depends on the smallest device in the
    set when memory is given in GiB). Every device is of one size on most hosts, so this is
    usually one set; :func:`place` then keeps the best.
    """
    k = demand.tensor_parallel_size
    sets: list[tuple[Device, ...]] = []
    for size in sorted({d.total_gib for d in inventory.devices}):
        pool = [d for d in inventory.devices if d.total_gib >= size]
        if len(pool) < k:
            continue
        share = _share(demand, size, default_share)
        fitting = sorted(
            (d for d in pool if free[d.index] - share * d.total_gib >= -_EPSILON_GIB),
            key=lambda d: (free[d.index] - share * d.total_gib, d.index),
        )
        if len(fitting) >= k:
            sets.append(tuple(sorted(fitting[:k], key=lambda d: d.index)))
    return sets


def _share(demand: Demand, smallest_gib: float, default_share: float) -> float:
    """gpu_memory_utilization for a demand whose smallest device has ``smallest_gib``."""
    if demand.memory_gib is not None:
        return demand.memory_gib / smallest_gib
    if demand.memory_share is not None:
        return demand.memory_share
    return default_share


def _allocate(demand: Demand, chosen: tuple[Device, ...], default_share: float) -> Allocation:
    """The allocation ``demand`` would have on exactly ``chosen``."""
    share = _share(demand, min(d.total_gib for d in chosen), default_share)
    return Allocation(
        model=demand.model,
        devices=tuple(d.index for d in chosen),
        memory_share=share,
        reserved_gib=tuple(share * d.total_gib for d in chosen),
    )


def _no_room_message(
    demand: Demand, inventory: Inventory, free: Mapping[int, float], default_share: float
) -> str:
    """``model m needs 2 device(s) with 60.0 GiB each; free: gpu0 12.0/80.0 GiB, ...``."""
    if demand.memory_gib is not None:
        each = f"{demand.memory_gib:.1f} GiB each"
    else:
        share = demand.memory_share if demand.memory_share is not None else default_share
        each = f"{share:.0%} of each device's memory"
    if demand.devices is not None:
        labels = ", ".join(f"{inventory.kind.value}{i}" for i in demand.devices)
        what = f"needs {labels} (pinned) with {each}"
    else:
        what = f"needs {demand.tensor_parallel_size} device(s) with {each}"
        if demand.tensor_parallel_size > len(inventory.devices):
            what += f" but the host has {len(inventory.devices)}"
    room = ", ".join(
        f"{d.label} {max(free[d.index], 0.0):.1f}/{d.total_gib:.1f} GiB" for d in inventory.devices
    )
    return f"model {demand.model} {what}; free: {room}"
