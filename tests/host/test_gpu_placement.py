"""Placement on simulated GPUs under vLLM's real start-up rule.

vLLM needs ``gpu_memory_utilization x CUDA total`` free after each engine's CUDA context
exists (``request_memory``, vllm/v1/worker/utils.py), so every engine also takes a headroom per
GPU outside its share. The packing rules themselves are in test_placement.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from appliance.catalogue.file_settings import Packing, PlacementSettings
from appliance.catalogue.schema import LocalModelSpec
from appliance.host.inventory import Device, DeviceKind, Inventory
from appliance.host.placement import (
    Allocation,
    Demand,
    PlacementError,
    PlacementPolicy,
    check_free,
    place,
)

SHARE = 0.9
SPREAD = PlacementPolicy()  # the default: spread, 1 GiB per engine, 0.5 more with TP
PACK = PlacementPolicy(packing=Packing.PACK)


def gpus(*sizes: float, links: dict[tuple[int, int], int] | None = None) -> Inventory:
    return Inventory(
        tuple(Device(i, f"gpu-{s:g}", float(s), DeviceKind.GPU) for i, s in enumerate(sizes)),
        links or {},
    )


def put(
    inventory: Inventory,
    allocations: Sequence[Allocation],
    model: str,
    policy: PlacementPolicy = SPREAD,
    **demand: object,
) -> Allocation:
    return place(
        Demand(model, **demand),  # type: ignore[arg-type]
        inventory,
        allocations,
        default_share=SHARE,
        policy=policy,
    )


H100x4 = gpus(79.1, 79.1, 79.1, 79.1)  # CUDA's total of an 80 GB H100


def test_two_half_shares_do_not_fit_one_gpu_beside_their_contexts() -> None:
    one = gpus(79.1)
    first = put(one, [], "a", memory_share=0.5)
    assert first.memory_share == 0.5  # what vLLM is handed
    assert first.reserved_gib == (pytest.approx(0.5 * 79.1 + 1.0),)
    with pytest.raises(PlacementError) as info:
        put(one, [first], "b", memory_share=0.5)
    assert "plus 1.0 GiB of CUDA context" in info.value.message
    assert "free: gpu0 38.5/79.1 GiB" in info.value.message


def test_the_readmes_example_spreads_over_empty_gpus() -> None:
    """8B, 7B and GPT-2 on four GPUs: one GPU each, not all three on gpu0."""
    placed: list[Allocation] = []
    placed.append(put(H100x4, placed, "llama-3-8b", memory_share=0.45))
    placed.append(put(H100x4, placed, "mistral-7b", memory_share=0.45))
    placed.append(put(H100x4, placed, "gpt2", memory_gib=4))
    assert [a.devices for a in placed] == [(0,), (1,), (2,)]


def test_pack_keeps_whole_gpus_free() -> None:
    placed: list[Allocation] = []
    placed.append(put(H100x4, placed, "llama-3-8b", PACK, memory_share=0.45))
    placed.append(put(H100x4, placed, "mistral-7b", PACK, memory_share=0.45))
    placed.append(put(H100x4, placed, "gpt2", PACK, memory_gib=4))
    assert [a.devices for a in placed] == [(0,), (0,), (0,)]
    assert sum(a.reserved_on(0) for a in placed) == pytest.approx(2 * 36.595 + 5.0)


def test_spread_fills_the_emptiest_gpu_first() -> None:
    taken = [Allocation("x", (0,), 0.2, (20.0,)), Allocation("y", (1,), 0.5, (45.0,))]
    assert put(gpus(79.1, 79.1, 79.1), taken, "m", memory_gib=10).devices == (2,)
    assert put(gpus(79.1, 79.1), taken, "m", memory_gib=10).devices == (0,)


def test_a_model_without_memory_leaves_room_for_its_context_on_a_small_gpu() -> None:
    small = gpus(7.6)  # an 8 GB card as CUDA counts it: 0.9 of it plus 1 GiB would not start
    allocation = put(small, [], "m")
    assert allocation.memory_share == pytest.approx((7.6 - 1.0) / 7.6)
    assert allocation.reserved_gib == (pytest.approx(7.6),)
    assert put(H100x4, [], "m").memory_share == SHARE


def test_tensor_parallel_prefers_nvlink_pairs_and_pays_for_nccl() -> None:
    # gpu0-gpu2 and gpu1-gpu3 are NVLink pairs; everything else crosses the host bridge.
    host = gpus(79.1, 79.1, 79.1, 79.1, links={(0, 2): 0, (1, 3): 0})
    allocation = put(host, [], "llama-70b", tensor_parallel_size=2, memory_gib=60)
    assert allocation.devices == (0, 2)
    assert allocation.headroom_gib == 1.5
    assert allocation.reserved_gib == (pytest.approx(61.5), pytest.approx(61.5))
    second = put(host, [allocation], "qwen-72b", tensor_parallel_size=2, memory_gib=60)
    assert second.devices == (1, 3)


def test_a_pin_also_pays_the_headroom() -> None:
    with pytest.raises(PlacementError, match="pinned"):
        put(gpus(79.1), [], "m", memory_gib=78.5, devices=(0,))


def test_the_cpu_has_no_cuda_context() -> None:
    cpu = Inventory((Device(0, "cpu", 8.0, DeviceKind.CPU),))
    assert put(cpu, [], "m", memory_gib=8).reserved_gib == (8.0,)


def test_policy_from_models_yaml() -> None:
    settings = PlacementSettings.model_validate(
        {"packing": "pack", "gpu_headroom_gib": 0.75, "tp_headroom_gib": 0.25}
    )
    policy = PlacementPolicy.from_settings(settings)
    assert policy == PlacementPolicy(Packing.PACK, 0.75, 0.25)
    assert policy.headroom(2, DeviceKind.GPU) == 1.0
    assert PlacementPolicy.from_settings(PlacementSettings()) == SPREAD


def test_sleeping_allocations_hold_only_their_context() -> None:
    allocation = put(H100x4, [], "m", memory_share=0.5)
    asleep = allocation.sleeping()
    assert asleep.asleep and asleep.reserved_gib == (1.0,)
    assert asleep.memory_share == 0.5 and asleep.devices == allocation.devices
    assert asleep.awake(H100x4) == allocation


def test_the_check_before_start_sees_memory_held_by_others() -> None:
    allocation = put(H100x4, [], "m", memory_share=0.5)
    check_free(allocation, H100x4, {0: 60.0})
    check_free(allocation, H100x4, {})  # no reading: nothing to check against
    with pytest.raises(PlacementError) as info:
        check_free(allocation, H100x4, {0: 12.3})
    assert info.value.message.startswith(
        "model m cannot start: gpu0 has 12.3 GiB free of 79.1, needs 40.5 GiB"
    )


# -- engine settings that would bypass placement are refused -----------------------------------


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"gpu_memory_utilization": 0.5}, "is set by placement"),
        ({"gpu-memory-utilization": 0.5}, "is set by placement"),
        ({"kv_cache_memory_bytes": 2**30}, "outside placement's budget"),
        ({"device_ids": "0,1"}, "pin GPUs with resources.devices"),
        ({"pipeline_parallel_size": 2}, "is not supported"),
        ({"data_parallel_size": 2}, "is not supported"),
        ({"distributed_executor_backend": "ray"}, "Ray placement groups"),
        ({"distributed_executor_backend": "external_launcher"}, "is not supported"),
        ({"num_gpu_blocks_override": 4096}, "by block count, past placement's memory budget"),
        # GPU multimodal work runs in every front-end process (vllm/multimodal/gpu_ipc_memory.py)
        ({"mm_ipc_gpu_memory_gb": 2}, "'mm_ipc_gpu_memory_gb' would run GPU multimodal work"),
        ({"media_io_kwargs": {"video": {"backend": "pynvvideocodec"}}}, "media_io_kwargs.video"),
        ({"media_io_kwargs": {"video": {"video_backend": "pynvvideocodec"}}}, "outside placement"),
        ({"media_io_kwargs": {"video": {"backend": "torchcodec", "device": "cuda"}}}, "video"),
        ({"mm_processor_device": "cuda"}, "'mm_processor_device'"),
        ({"mm_processor_kwargs": {"device": "cuda:0"}}, "'mm_processor_kwargs.device'"),
    ],
)
def test_engine_settings_that_override_placement_are_refused(
    engine: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalModelSpec(name="m", source="org/m", engine=engine)


def test_engine_settings_that_agree_with_placement_are_accepted() -> None:
    LocalModelSpec(
        name="m",
        source="org/m",
        engine={"pipeline_parallel_size": 1, "distributed_executor_backend": "mp"},
    )
    LocalModelSpec(
        name="m",
        source="org/m",
        engine={
            "mm_ipc_gpu_memory_gb": 0,
            "mm_processor_device": "cpu",
            "media_io_kwargs": {"video": {"backend": "torchcodec", "num_frames": 16}},
        },
    )
