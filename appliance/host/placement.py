"""Where a model's engine goes: which devices, and how much memory on each.

Pure functions over an :class:`Inventory` and the allocations already made; no I/O. The
accounting follows vLLM's own start-up rule (``request_memory`` in ``vllm/v1/worker/utils.py``):
a worker started with ``gpu_memory_utilization=u`` needs ``u x total`` free, measured *after*
its CUDA context (and NCCL, with tensor parallelism) exists, where ``total`` is CUDA's total.
So an engine really takes ``u x total`` plus that context on every GPU it spans, and an
allocation reserves both: the share, and a headroom per engine per GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from appliance.catalogue.file_settings import Packing, PlacementSettings
from appliance.catalogue.schema import ModelSpec
from appliance.errors import InsufficientResourcesError
from appliance.host.inventory import Device, DeviceKind, Inventory

# Float slack, so that three models of 0.3 each still fit on a device whose share sums to 0.9.
_EPSILON_GIB = 1e-6
# Device sets tried for one tensor-parallel model at most; beyond it the likeliest are kept.
_MAX_CANDIDATE_SETS = 4096


@dataclass(frozen=True)
class PlacementPolicy:
    """The rules placement follows beyond the memory arithmetic.

    ``headroom_gib`` is what one engine takes on a GPU outside its vLLM budget (its CUDA
    context, the memory vLLM measures only after creating it); ``tp_headroom_gib`` is added
    per GPU when the engine spans several (NCCL's buffers). Neither applies on the CPU.
    ``measured_tp_gib`` is what ``appliance doctor`` measured a tensor-parallel rank to take
    (NCCL and vLLM's custom all-reduce, across ``measured_world`` GPUs: ``tp_overheads``); it
    raises ``tp_headroom_gib`` for engines of that many GPUs or fewer, never lowers it.
    """

    packing: Packing = Packing.SPREAD
    headroom_gib: float = 1.0
    tp_headroom_gib: float = 0.5
    measured_tp_gib: float = 0.0
    measured_world: int = 0

    @classmethod
    def from_settings(cls, settings: PlacementSettings) -> PlacementPolicy:
        """The policy ``placement:`` in models.yaml asks for."""
        return cls(settings.packing, settings.gpu_headroom_gib, settings.tp_headroom_gib)

    def headroom(self, tensor_parallel_size: int, kind: DeviceKind) -> float:
        """GiB one engine takes per device outside its share."""
        if kind is not DeviceKind.GPU:
            return 0.0
        if tensor_parallel_size <= 1:
            return self.headroom_gib
        return self.headroom_gib + self.tp_headroom_for(tensor_parallel_size)

    def tp_headroom_for(self, tensor_parallel_size: int) -> float:
        """GiB per GPU a ``tensor_parallel_size``-GPU engine takes for its collectives: the
        estimate, or the measurement when one covers that many GPUs and is larger (NCCL's
        buffers grow with the peers, so a measurement over N GPUs covers fewer)."""
        if 1 < tensor_parallel_size <= self.measured_world:
            return max(self.tp_headroom_gib, self.measured_tp_gib)
        return self.tp_headroom_gib


# Exact arithmetic and best fit: what placement did before it knew vLLM's headroom; kept for
# the CPU budget's tests and for callers that model memory some other way.
EXACT_PACK = PlacementPolicy(Packing.PACK, 0.0, 0.0)


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
    reserved_gib: tuple[float, ...]  # per device, in the order of ``devices``; headroom included
    headroom_gib: float = 0.0  # of each reservation, what the engine takes outside its share
    asleep: bool = False  # the engine sleeps: only its headroom is held on the devices

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

    def sleeping(self, kept_gib: Sequence[float] | None = None) -> Allocation:
        """The same engine asleep: its share is given back, what sleep keeps stays.

        ``kept_gib`` is what a sleep of this engine was measured to leave on each device (CUDA
        context, NCCL, allocations outside vLLM's pool: ``sleep_residue``); without a
        measurement, only the headroom is assumed to stay.
        """
        if kept_gib is None or len(kept_gib) != len(self.devices):
            kept_gib = (self.headroom_gib,) * len(self.devices)
        return replace(self, reserved_gib=tuple(float(g) for g in kept_gib), asleep=True)

    def awake(self, inventory: Inventory) -> Allocation:
        """The same engine awake again: its whole reservation on the same devices."""
        totals = [_device(inventory, i).total_gib for i in self.devices]
        return replace(
            self,
            reserved_gib=tuple(self.memory_share * t + self.headroom_gib for t in totals),
            asleep=False,
        )


class PlacementError(InsufficientResourcesError):
    """A model does not fit: the message says what it needs and what each device has free."""


def place(
    demand: Demand,
    inventory: Inventory,
    allocations: Sequence[Allocation],
    *,
    default_share: float,
    policy: PlacementPolicy = PlacementPolicy(),
) -> Allocation:
    """Choose devices for ``demand`` beside the existing ``allocations``.

    Memory per device is ``memory_gib``, else ``memory_share`` of the device's total, else
    ``default_share`` of it (less the headroom, on a GPU too small for both); the allocation
    reserves that plus the policy's headroom. Models share a device while their reservations
    sum to at most its total; a tensor-parallel model gets that many distinct devices; pins are
    honoured exactly. Among the candidates the one reserving least in all wins (it differs only
    when a tensor-parallel model could span cards of unequal size), then the best-linked set
    (NVLink first), then the policy's packing (emptiest or tightest), then the lowest indices,
    so the same inputs always give the same answer.

    Raises:
        PlacementError: the model does not fit, or is pinned to a device the host lacks.
        ValueError: ``allocations`` already holds ``demand.model`` (a caller bug).
    """
    if any(a.model == demand.model for a in allocations):
        raise ValueError(f"model {demand.model} is already placed")
    free = _free_gib(inventory, allocations)
    if demand.devices is not None:
        candidates: Iterator[tuple[Device, ...]] = iter(_pinned_candidates(demand, inventory))
    else:
        candidates = _candidate_sets(demand, inventory, free, default_share, policy)
    best: tuple[tuple[float, ...], Allocation] | None = None
    for chosen in candidates:
        allocation = _allocate(demand, chosen, default_share, policy, inventory.kind)
        left = [free[d.index] - gib for d, gib in zip(chosen, allocation.reserved_gib, strict=True)]
        if min(left) < -_EPSILON_GIB:
            continue
        # Least reserved in all first: on devices of unequal size one share over-reserves on
        # the bigger ones, memory no model can use. Then the fastest links, then packing.
        fit = -sum(left) if policy.packing is Packing.SPREAD else sum(left)
        key = (
            round(sum(allocation.reserved_gib), 6),
            _link_cost(inventory, allocation.devices),
            round(fit, 6),
            *allocation.devices,
        )
        if best is None or key < best[0]:
            best = (key, allocation)
    if best is None:
        raise PlacementError(_no_room_message(demand, inventory, free, default_share, policy))
    return best[1]


def plan_eviction(
    demand: Demand,
    inventory: Inventory,
    allocations: Sequence[Allocation],
    evictable: Mapping[str, float],
    *,
    default_share: float,
    policy: PlacementPolicy = PlacementPolicy(),
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

    def fits_without(evicted: set[str]) -> Allocation | None:
        kept = [a for a in allocations if a.model not in evicted]
        try:
            return place(demand, inventory, kept, default_share=default_share, policy=policy)
        except PlacementError:
            return None

    try:
        return place(demand, inventory, allocations, default_share=default_share, policy=policy), []
    except PlacementError as exc:
        first_error = exc
    placed = {a.model for a in allocations}
    # Ties in last use broken by name, so the plan is deterministic.
    order = sorted(
        (name for name in evictable if name in placed and name != demand.model),
        key=lambda name: (evictable[name], name),
    )
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


def check_free(allocation: Allocation, inventory: Inventory, free_gib: Mapping[int, float]) -> None:
    """Refuse a start that vLLM would refuse: each device needs the engine's reservation free.

    ``free_gib`` is what the device reports free right now (NVML), which also sees memory held
    by processes the appliance does not know about. Devices missing from it are not checked.

    Raises:
        PlacementError: naming each device that lacks room and what it has free.
    """
    short = [
        (index, need, free_gib[index])
        for index, need in zip(allocation.devices, allocation.reserved_gib, strict=True)
        if index in free_gib and free_gib[index] + _EPSILON_GIB < need
    ]
    if not short:
        return
    kind = inventory.kind.value
    details = ", ".join(
        f"{kind}{i} has {have:.1f} GiB free of {_device(inventory, i).total_gib:.1f}, "
        f"needs {need:.1f} GiB"
        for i, need, have in short
    )
    raise PlacementError(
        f"model {allocation.model} cannot start: {details} (memory held outside this "
        "appliance's placement, by another process or an engine still shutting down; "
        "see `nvidia-smi`)"
    )


def _device(inventory: Inventory, index: int) -> Device:
    device = inventory.get(index)
    if device is None:
        raise ValueError(f"device {index} is not in the inventory")
    return device


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
    demand: Demand,
    inventory: Inventory,
    free: Mapping[int, float],
    default_share: float,
    policy: PlacementPolicy,
) -> Iterator[tuple[Device, ...]]:
    """Device sets worth trying for an unpinned demand.

    For each device size ``s``, the sets of ``tensor_parallel_size`` devices of at least size
    ``s`` that each have room (the share, and so the reservation, depends on the smallest
    device in the set when memory is given in GiB). Every combination is offered, so that
    :func:`place` can weigh links and packing; on a big host the combinations are capped,
    keeping the devices the policy would prefer.
    """
    k = demand.tensor_parallel_size
    headroom = policy.headroom(k, inventory.kind)
    seen: set[tuple[int, ...]] = set()
    for size in sorted({d.total_gib for d in inventory.devices}):
        pool = [d for d in inventory.devices if d.total_gib >= size]
        if len(pool) < k:
            continue
        share = _share(demand, size, default_share, headroom)
        fitting = [
            d for d in pool if free[d.index] - share * d.total_gib - headroom >= -_EPSILON_GIB
        ]
        if len(fitting) < k:
            continue
        spread = policy.packing is Packing.SPREAD
        fitting.sort(key=lambda d: (-free[d.index] if spread else free[d.index], d.index))
        for count, chosen in enumerate(itertools.combinations(fitting, k)):
            if count >= _MAX_CANDIDATE_SETS:
                break
            key = tuple(sorted(d.index for d in chosen))
            if key not in seen:
                seen.add(key)
                yield tuple(sorted(chosen, key=lambda d: d.index))


def _link_cost(inventory: Inventory, devices: tuple[int, ...]) -> int:
    """The slowest link inside a set of devices (0 for one device or an all-NVLink set)."""
    if len(devices) < 2 or inventory.kind is not DeviceKind.GPU:
        return 0
    return max(inventory.link(a, b) for a, b in itertools.combinations(devices, 2))


def _share(demand: Demand, smallest_gib: float, default_share: float, headroom: float) -> float:
    """gpu_memory_utilization for a demand whose smallest device has ``smallest_gib``."""
    if demand.memory_gib is not None:
        return demand.memory_gib / smallest_gib
    if demand.memory_share is not None:
        return demand.memory_share
    # A model that says nothing takes the default share, or what the headroom leaves of a
    # small GPU: 0.9 of a 16 GiB card plus 1 GiB of context would never start.
    return max(min(default_share, (smallest_gib - headroom) / smallest_gib), 0.0)


def _allocate(
    demand: Demand,
    chosen: tuple[Device, ...],
    default_share: float,
    policy: PlacementPolicy,
    kind: DeviceKind,
) -> Allocation:
    """The allocation ``demand`` would have on exactly ``chosen``."""
    headroom = policy.headroom(demand.tensor_parallel_size, kind)
    share = _share(demand, min(d.total_gib for d in chosen), default_share, headroom)
    return Allocation(
        model=demand.model,
        devices=tuple(d.index for d in chosen),
        memory_share=share,
        reserved_gib=tuple(share * d.total_gib + headroom for d in chosen),
        headroom_gib=headroom,
    )


def _no_room_message(
    demand: Demand,
    inventory: Inventory,
    free: Mapping[int, float],
    default_share: float,
    policy: PlacementPolicy,
) -> str:
    """``model m needs 2 device(s) with 60.0 GiB each; free: gpu0 12.0/80.0 GiB, ...``."""
    if demand.memory_gib is not None:
        each = f"{demand.memory_gib:.1f} GiB each"
    else:
        share = demand.memory_share if demand.memory_share is not None else default_share
        each = f"{share:.0%} of each device's memory"
    headroom = policy.headroom(demand.tensor_parallel_size, inventory.kind)
    if headroom:
        each += f" plus {headroom:.1f} GiB of CUDA context"
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
