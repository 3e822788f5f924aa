"""Placement of models on simulated inventories, and eviction planning."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from appliance.catalogue.schema import LocalModelSpec
from appliance.errors import InsufficientResourcesError
from appliance.host.inventory import Device, DeviceKind, Inventory, cpu_inventory
from appliance.host.placement import (
    EXACT_PACK,
    Allocation,
    Demand,
    PlacementError,
    place,
    plan_eviction,
)

SHARE = 0.9  # the supervisor's default for a model that declares no memory


def gpus(*sizes: float) -> Inventory:
    """An inventory of GPUs of these sizes in GiB, indexed from 0."""
    return Inventory(
        tuple(
            Device(i, f"gpu-{size:g}", float(size), DeviceKind.GPU) for i, size in enumerate(sizes)
        )
    )


def put(
    inventory: Inventory, allocations: Sequence[Allocation], model: str, **demand: object
) -> Allocation:
    """Place a model and return its allocation (the tests chain these)."""
    # Exact arithmetic and best fit: these tests pin down the packing rules themselves; the
    # headroom and spreading vLLM needs on a GPU are tested in test_gpu_placement.py.
    return place(
        Demand(model, **demand),  # type: ignore[arg-type]
        inventory,
        allocations,
        default_share=SHARE,
        policy=EXACT_PACK,
    )


def taken(model: str, devices: tuple[int, ...], gib: float, total: float) -> Allocation:
    """An existing allocation of ``gib`` on each of ``devices`` (all of size ``total``)."""
    return Allocation(model, devices, gib / total, (gib,) * len(devices))


H100x8 = gpus(*[80] * 8)
RTXx2 = gpus(24, 24)
MIXED = gpus(80, 24, 48)


# -- demands ---------------------------------------------------------------------------------


def test_demand_from_spec() -> None:
    spec = LocalModelSpec(
        name="llama-70b",
        source="meta-llama/Llama-3.1-70B-Instruct",
        resources={"tensor_parallel_size": 2, "memory_gib": 60, "devices": [4, 5]},
    )
    assert Demand.from_spec(spec) == Demand("llama-70b", 2, 60.0, None, (4, 5))
    assert Demand.from_spec(LocalModelSpec(name="tiny", source="x")) == Demand("tiny", 1)


def test_demand_refuses_pins_that_do_not_match_tensor_parallel() -> None:
    with pytest.raises(ValueError, match="pins 1 device"):
        Demand("m", tensor_parallel_size=2, devices=(0,))


# -- single models ---------------------------------------------------------------------------


def test_default_share_takes_most_of_the_first_gpu() -> None:
    allocation = put(H100x8, [], "m")
    assert allocation.devices == (0,)
    assert allocation.memory_share == pytest.approx(0.9)
    assert allocation.memory_gib == pytest.approx(72.0)
    assert allocation.share_of(H100x8.devices[0]) == pytest.approx(0.9)
    assert allocation.share_of(H100x8.devices[1]) == 0.0


def test_memory_gib_sets_the_share_handed_to_vllm() -> None:
    allocation = put(RTXx2, [], "m", memory_gib=18)
    assert allocation.devices == (0,)
    assert allocation.memory_gib == pytest.approx(18.0)
    assert allocation.memory_share == pytest.approx(0.75)


def test_default_share_models_fill_one_gpu_each() -> None:
    allocations: list[Allocation] = []
    for i in range(8):
        allocations.append(put(H100x8, allocations, f"m{i}"))
    assert [a.devices for a in allocations] == [(i,) for i in range(8)]
    with pytest.raises(PlacementError):
        put(H100x8, allocations, "ninth")


def test_several_small_models_share_one_gpu() -> None:
    allocations: list[Allocation] = []
    for i in range(3):
        allocations.append(put(RTXx2, allocations, f"small{i}", memory_share=0.3))
    # 0.3 three times is 0.9000000000000001 in floats; it still fits beside 0.1.
    allocations.append(put(RTXx2, allocations, "tiny", memory_share=0.1))
    assert {a.devices for a in allocations} == {(0,)}
    # The GPU is now full to the byte: the next one goes to gpu1.
    assert put(RTXx2, allocations, "next", memory_gib=1).devices == (1,)


def test_best_fit_keeps_the_big_hole_for_big_models() -> None:
    # gpu0 has 50 GiB free, gpu1 20 GiB free, gpu2 80: a 16 GiB model goes to the tightest.
    existing = [taken("a", (0,), 30, 80), taken("b", (1,), 60, 80)]
    inventory = gpus(80, 80, 80)
    assert put(inventory, existing, "small", memory_gib=16).devices == (1,)
    assert put(inventory, existing, "medium", memory_gib=40).devices == (0,)
    assert put(inventory, existing, "big", memory_gib=70).devices == (2,)


def test_best_fit_on_mixed_sizes() -> None:
    assert put(MIXED, [], "s", memory_gib=20).devices == (1,)  # the 24 GiB card
    assert put(MIXED, [], "m", memory_gib=40).devices == (2,)  # the 48 GiB card
    assert put(MIXED, [], "l", memory_gib=70).devices == (0,)  # the 80 GiB card


def test_ties_go_to_the_lowest_index() -> None:
    existing = [taken("a", (5,), 40, 80), taken("b", (2,), 40, 80)]
    assert put(H100x8, existing, "c", memory_gib=40).devices == (2,)
    assert put(H100x8, [], "d", memory_gib=10).devices == (0,)


def test_placement_is_deterministic() -> None:
    existing = [taken("a", (3,), 20, 80), taken("b", (6,), 20, 80)]
    first = put(H100x8, existing, "m", tensor_parallel_size=2, memory_gib=60)
    assert all(
        put(H100x8, existing, "m", tensor_parallel_size=2, memory_gib=60) == first for _ in range(5)
    )
    assert first.devices == (3, 6)


# -- tensor parallel -------------------------------------------------------------------------


def test_tensor_parallel_gets_distinct_devices() -> None:
    allocation = put(H100x8, [], "llama-405b", tensor_parallel_size=8)
    assert allocation.devices == tuple(range(8))
    assert allocation.reserved_gib == pytest.approx((72.0,) * 8)


def test_tensor_parallel_skips_devices_without_room() -> None:
    existing = [taken("a", (0,), 30, 80), taken("b", (2,), 30, 80)]
    allocation = put(H100x8, existing, "m", tensor_parallel_size=4, memory_gib=60)
    assert allocation.devices == (1, 3, 4, 5)


def test_tensor_parallel_prefers_the_tightest_devices() -> None:
    existing = [taken("a", (1,), 10, 80), taken("b", (3,), 10, 80)]
    allocation = put(H100x8, existing, "m", tensor_parallel_size=2, memory_gib=60)
    assert allocation.devices == (1, 3)


def test_tensor_parallel_larger_than_the_host() -> None:
    with pytest.raises(PlacementError) as info:
        put(RTXx2, [], "m", tensor_parallel_size=4, memory_gib=10)
    assert info.value.message == (
        "model m needs 4 device(s) with 10.0 GiB each but the host has 2; "
        "free: gpu0 24.0/24.0 GiB, gpu1 24.0/24.0 GiB"
    )


def test_tensor_parallel_on_mixed_sizes_reserves_what_vllm_will_take() -> None:
    # vLLM applies one gpu_memory_utilization to every device: 20 GiB on the 24 GiB card
    # means 5/6 of the 48 GiB card too, so 40 GiB is reserved there.
    allocation = put(gpus(24, 48), [], "m", tensor_parallel_size=2, memory_gib=20)
    assert allocation.devices == (0, 1)
    assert allocation.memory_share == pytest.approx(20 / 24)
    assert allocation.reserved_gib == pytest.approx((20.0, 40.0))


def test_tensor_parallel_on_mixed_sizes_prefers_equal_cards_when_they_fit() -> None:
    inventory = gpus(24, 80, 48, 80)
    allocation = put(inventory, [], "m", tensor_parallel_size=2, memory_gib=40)
    assert allocation.devices == (1, 3)
    assert allocation.reserved_gib == pytest.approx((40.0, 40.0))


# -- pins ------------------------------------------------------------------------------------


def test_pins_are_honoured_exactly() -> None:
    allocation = put(H100x8, [], "m", tensor_parallel_size=2, memory_gib=30, devices=(6, 2))
    assert allocation.devices == (6, 2)  # in the order given: rank 0 on gpu6


def test_pin_to_a_full_device_fails_even_with_room_elsewhere() -> None:
    existing = [taken("a", (1,), 72, 80)]
    with pytest.raises(PlacementError) as info:
        put(gpus(80, 80), existing, "m", memory_gib=20, devices=(1,))
    assert info.value.message == (
        "model m needs gpu1 (pinned) with 20.0 GiB each; "
        "free: gpu0 80.0/80.0 GiB, gpu1 8.0/80.0 GiB"
    )


def test_pin_to_an_unknown_device_says_which_exist() -> None:
    with pytest.raises(PlacementError) as info:
        put(RTXx2, [], "m", tensor_parallel_size=2, devices=(1, 7))
    assert info.value.message == (
        "model m is pinned to gpu7, which this host does not have; devices: "
        "gpu0 gpu-24 (24.0 GiB), gpu1 gpu-24 (24.0 GiB)"
    )


# -- too large -------------------------------------------------------------------------------


def test_too_large_names_what_it_needs_and_what_is_free() -> None:
    existing = [taken("a", (0,), 68, 80)]
    with pytest.raises(PlacementError) as info:
        put(gpus(80, 80), existing, "llama-70b", tensor_parallel_size=2, memory_gib=60)
    assert isinstance(info.value, InsufficientResourcesError)
    assert info.value.status_code == 507
    assert info.value.message == (
        "model llama-70b needs 2 device(s) with 60.0 GiB each; "
        "free: gpu0 12.0/80.0 GiB, gpu1 80.0/80.0 GiB"
    )


def test_too_large_for_any_card() -> None:
    with pytest.raises(PlacementError, match=r"needs 1 device\(s\) with 30.0 GiB each"):
        put(RTXx2, [], "m", memory_gib=30)


def test_share_demand_message() -> None:
    existing = [taken("a", (0,), 12, 24), taken("b", (1,), 12, 24)]
    with pytest.raises(PlacementError, match="needs 1 device\\(s\\) with 90% of each device's"):
        put(RTXx2, existing, "m")


def test_placing_a_model_twice_is_a_caller_bug() -> None:
    existing = [put(H100x8, [], "m")]
    with pytest.raises(ValueError, match="already placed"):
        put(H100x8, existing, "m")


# -- CPU -------------------------------------------------------------------------------------


def test_cpu_budget_follows_the_same_rules() -> None:
    cpu = cpu_inventory(16)
    a = put(cpu, [], "tiny-llama", memory_gib=4)
    b = put(cpu, [a], "tiny-mistral", memory_gib=4)
    c = put(cpu, [a, b], "minilm", memory_share=0.25)
    assert [x.devices for x in (a, b, c)] == [(0,), (0,), (0,)]
    assert c.memory_gib == pytest.approx(4.0)
    with pytest.raises(PlacementError) as info:
        put(cpu, [a, b, c], "gpt2", memory_gib=8)
    assert info.value.message == (
        "model gpt2 needs 1 device(s) with 8.0 GiB each; free: cpu0 4.0/16.0 GiB"
    )


# -- eviction --------------------------------------------------------------------------------


def evict(
    inventory: Inventory,
    allocations: Sequence[Allocation],
    evictable: dict[str, float],
    model: str,
    **demand: object,
) -> tuple[Allocation, list[str]]:
    return plan_eviction(
        Demand(model, **demand),  # type: ignore[arg-type]
        inventory,
        allocations,
        evictable,
        default_share=SHARE,
        policy=EXACT_PACK,
    )


ONE_GPU = gpus(80)
# 60 of 80 GiB taken by three evictable 20 GiB models, b used longest ago, then c, then a.
THREE = [taken(name, (0,), 20, 80) for name in ("a", "b", "c")]
LAST_USED = {"a": 300.0, "b": 100.0, "c": 200.0}


def test_no_eviction_when_it_fits() -> None:
    allocation, evicted = evict(ONE_GPU, THREE, LAST_USED, "m", memory_gib=20)
    assert (allocation.devices, evicted) == ((0,), [])


def test_evicts_least_recently_used_first_and_only_as_many_as_needed() -> None:
    assert evict(ONE_GPU, THREE, LAST_USED, "m", memory_gib=35)[1] == ["b"]
    assert evict(ONE_GPU, THREE, LAST_USED, "m", memory_gib=50)[1] == ["b", "c"]
    assert evict(ONE_GPU, THREE, LAST_USED, "m", memory_gib=80)[1] == ["b", "c", "a"]


def test_models_not_evictable_stay() -> None:
    allocation, evicted = evict(ONE_GPU, THREE, {"a": 300.0, "c": 200.0}, "m", memory_gib=50)
    assert evicted == ["c", "a"]
    assert allocation.devices == (0,)


def test_evictions_that_do_not_help_are_spared() -> None:
    # The oldest model sits on gpu0, but the new one is pinned to gpu1: evicting it is useless.
    existing = [taken("old", (0,), 60, 80), taken("newer", (1,), 60, 80)]
    allocation, evicted = evict(
        gpus(80, 80), existing, {"old": 1.0, "newer": 2.0}, "m", memory_gib=40, devices=(1,)
    )
    assert (allocation.devices, evicted) == ((1,), ["newer"])


def test_tensor_parallel_eviction_frees_enough_devices() -> None:
    existing = [taken(f"m{i}", (i,), 60, 80) for i in range(4)]
    last_used = {"m0": 4.0, "m1": 1.0, "m2": 3.0, "m3": 2.0}
    allocation, evicted = evict(
        gpus(80, 80, 80, 80), existing, last_used, "big", tensor_parallel_size=2, memory_gib=70
    )
    assert evicted == ["m1", "m3"]
    assert allocation.devices == (1, 3)


def test_eviction_that_cannot_help_evicts_nothing() -> None:
    existing = [taken("pinned", (0,), 60, 80), *[taken(n, (0,), 5, 80) for n in ("x", "y")]]
    with pytest.raises(PlacementError) as info:
        evict(ONE_GPU, existing, {"x": 1.0, "y": 2.0}, "m", memory_gib=40)
    assert info.value.message == (
        "model m needs 1 device(s) with 40.0 GiB each; free: gpu0 10.0/80.0 GiB; "
        "evicting every evictable model (x, y) would not make room"
    )


def test_unknown_and_self_names_in_evictable_are_ignored() -> None:
    allocation, evicted = evict(
        ONE_GPU, THREE, {"ghost": 0.0, "m": 0.5, **LAST_USED}, "m", memory_gib=35
    )
    assert evicted == ["b"]
    assert allocation.devices == (0,)


def test_eviction_for_a_pin_to_an_unknown_device_says_so() -> None:
    with pytest.raises(PlacementError, match="pinned to gpu3, which this host does not have"):
        evict(ONE_GPU, THREE, LAST_USED, "m", memory_gib=10, devices=(3,))
