"""The device inventory, read through a fake pynvml module."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from appliance.host.inventory import (
    Device,
    DeviceKind,
    GpuMemory,
    Inventory,
    cpu_inventory,
    detect_inventory,
    gpu_memory_used,
    read_gpu_inventory,
)

GIB = 1 << 30


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeMemory:
    total: int
    used: int
    free: int


def fake_pynvml(
    gpus: list[tuple[str, float, float]],
    *,
    init_fails: bool = False,
    broken: frozenset[int] = frozenset(),
    name_as_bytes: bool = False,
) -> types.ModuleType:
    """A pynvml with ``gpus`` as (name, total GiB, used GiB); counts init and shutdown calls."""
    module = types.ModuleType("pynvml")
    calls = {"init": 0, "shutdown": 0}

    def nvmlInit() -> None:
        if init_fails:
            raise FakeNVMLError("Driver Not Loaded")
        calls["init"] += 1

    def nvmlShutdown() -> None:
        calls["shutdown"] += 1

    def handle_of(index: int) -> int:
        if index in broken:
            raise FakeNVMLError("GPU is lost")
        return index

    def name_of(handle: int) -> str | bytes:
        name = gpus[handle][0]
        return name.encode() if name_as_bytes else name

    def memory_of(handle: int) -> FakeMemory:
        _, total, used = gpus[handle]
        return FakeMemory(int(total * GIB), int(used * GIB), int((total - used) * GIB))

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    module.nvmlShutdown = nvmlShutdown  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = handle_of  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = name_of  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = memory_of  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: f"GPU-{h:08d}"  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


@pytest.fixture
def use_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Install a fake pynvml for the test; returns it for call counts."""

    def install(*args: object, **kwargs: object) -> types.ModuleType:
        module = fake_pynvml(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return install


def test_eight_80gb_gpus(use_nvml: Callable[..., types.ModuleType]) -> None:
    nvml = use_nvml([("NVIDIA H100 80GB HBM3", 80.0, 0.5)] * 8)

    inventory = read_gpu_inventory()

    assert inventory is not None
    assert inventory.kind is DeviceKind.GPU
    assert [d.index for d in inventory.devices] == list(range(8))
    assert inventory.devices[3] == Device(
        3, "NVIDIA H100 80GB HBM3", 80.0, DeviceKind.GPU, "GPU-00000003"
    )
    assert nvml.calls == {"init": 1, "shutdown": 1}  # type: ignore[attr-defined]


def test_two_24gb_gpus_with_bytes_names(use_nvml: Callable[..., types.ModuleType]) -> None:
    use_nvml([("NVIDIA GeForce RTX 4090", 24.0, 1.0)] * 2, name_as_bytes=True)

    inventory = read_gpu_inventory()

    assert inventory is not None
    assert [(d.label, d.name, d.total_gib) for d in inventory.devices] == [
        ("gpu0", "NVIDIA GeForce RTX 4090", 24.0),
        ("gpu1", "NVIDIA GeForce RTX 4090", 24.0),
    ]


def test_nvml_failing_means_no_gpus(use_nvml: Callable[..., types.ModuleType]) -> None:
    use_nvml([("NVIDIA A100", 80.0, 0.0)], init_fails=True)
    assert read_gpu_inventory() is None
    assert gpu_memory_used() == []


def test_no_pynvml_installed_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes ``import pynvml`` fail
    assert read_gpu_inventory() is None
    assert gpu_memory_used() == []


def test_zero_gpus_means_no_gpus(use_nvml: Callable[..., types.ModuleType]) -> None:
    nvml = use_nvml([])
    assert read_gpu_inventory() is None
    assert nvml.calls == {"init": 1, "shutdown": 1}  # type: ignore[attr-defined]


def test_a_lost_gpu_is_left_out_and_others_keep_their_index(
    use_nvml: Callable[..., types.ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    # Importing vLLM elsewhere in the session raises the root level to ERROR: ask for warnings.
    caplog.set_level(logging.WARNING, logger="appliance.host.inventory")
    use_nvml([("A", 80.0, 0.0), ("B", 80.0, 0.0), ("C", 80.0, 0.0)], broken=frozenset({1}))

    inventory = read_gpu_inventory()

    assert inventory is not None
    assert [d.index for d in inventory.devices] == [0, 2]
    assert "gpu1" in caplog.text


def test_detect_prefers_gpus(use_nvml: Callable[..., types.ModuleType]) -> None:
    use_nvml([("NVIDIA L4", 24.0, 0.0)])
    assert detect_inventory(cpu_memory_budget_gib=16).kind is DeviceKind.GPU


def test_detect_falls_back_to_the_cpu(use_nvml: Callable[..., types.ModuleType]) -> None:
    use_nvml([], init_fails=True)
    inventory = detect_inventory(cpu_memory_budget_gib=16)
    assert inventory == Inventory((Device(0, "cpu", 16.0, DeviceKind.CPU, None),))
    assert inventory.kind is DeviceKind.CPU


def test_cpu_inventory_needs_a_positive_budget() -> None:
    with pytest.raises(ValueError, match="above 0"):
        cpu_inventory(0)


def test_gpu_memory_used(use_nvml: Callable[..., types.ModuleType]) -> None:
    nvml = use_nvml([("A", 24.0, 6.0), ("B", 24.0, 0.0), ("C", 48.0, 12.0)], broken={1})
    assert gpu_memory_used() == [
        GpuMemory(0, "GPU-00000000", 6.0, 24.0),
        GpuMemory(2, "GPU-00000002", 12.0, 48.0),
    ]
    assert nvml.calls == {"init": 1, "shutdown": 1}  # type: ignore[attr-defined]


def test_reading_gpus_never_imports_torch(use_nvml: Callable[..., types.ModuleType]) -> None:
    use_nvml([("A", 80.0, 0.0)])
    before = {name for name in sys.modules if name.split(".")[0] in {"torch", "vllm"}}
    detect_inventory(cpu_memory_budget_gib=8)
    gpu_memory_used()
    after = {name for name in sys.modules if name.split(".")[0] in {"torch", "vllm"}}
    assert after == before


@pytest.mark.parametrize(
    "devices",
    [
        (),
        (Device(0, "a", 1, DeviceKind.GPU), Device(0, "b", 1, DeviceKind.GPU)),
        (Device(0, "a", 1, DeviceKind.GPU), Device(1, "cpu", 1, DeviceKind.CPU)),
    ],
    ids=["empty", "duplicate-index", "mixed-kinds"],
)
def test_inventory_refuses_nonsense(devices: tuple[Device, ...]) -> None:
    with pytest.raises(ValueError):
        Inventory(devices)
