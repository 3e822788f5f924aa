"""What the inventory reads of a GPU host that placement depends on: CUDA's totals, the
operator's CUDA_VISIBLE_DEVICES, MIG, links between GPUs, and one NVML session for metrics.

A simulated NVML stands in for the driver (no GPU here); its numbers follow an H100 host.
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, field

import pytest

from appliance.errors import ConfigError
from appliance.host.inventory import (
    LINK_NVLINK,
    GpuMonitor,
    detect_inventory,
    scan_gpus,
)

GIB = 1 << 30
NVLINK = "nvlink"


class SimulatedNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class Gpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total_gib: float = 79.65  # NVML's total
    reserved_gib: float = 0.55  # what the driver keeps: CUDA's total is 79.1
    used_gib: float = 0.0
    mig: bool = False
    processes: dict[int, float] = field(default_factory=dict)  # pid -> GiB, as NVML lists


@dataclass
class SimulatedNVML:
    """The parts of pynvml the inventory uses, over a list of GPUs."""

    gpus: list[Gpu]
    links: dict[tuple[int, int], str | int] = field(default_factory=dict)
    v2: bool = True
    inits: int = 0

    def module(self) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        m.NVMLError = SimulatedNVMLError  # type: ignore[attr-defined]
        m.nvmlInit = self._init  # type: ignore[attr-defined]
        m.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
        m.nvmlDeviceGetCount = lambda: len(self.gpus)  # type: ignore[attr-defined]
        m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
        m.nvmlDeviceGetName = lambda h: self.gpus[h].name  # type: ignore[attr-defined]
        m.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}-uuid"  # type: ignore[attr-defined]
        m.nvmlDeviceGetMemoryInfo = self._memory  # type: ignore[attr-defined]
        m.nvmlDeviceGetMigMode = self._mig  # type: ignore[attr-defined]
        m.nvmlDeviceGetComputeRunningProcesses = self._processes  # type: ignore[attr-defined]
        m.nvmlDeviceGetP2PStatus = self._p2p  # type: ignore[attr-defined]
        m.nvmlDeviceGetTopologyCommonAncestor = self._ancestor  # type: ignore[attr-defined]
        m.NVML_P2P_CAPS_INDEX_NVLINK = 4  # type: ignore[attr-defined]
        m.NVML_P2P_STATUS_OK = 0  # type: ignore[attr-defined]
        if self.v2:
            m.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
        return m

    def _init(self) -> None:
        self.inits += 1

    def _memory(self, handle: int, version: int | None = None) -> types.SimpleNamespace:
        gpu = self.gpus[handle]
        total, used = int(gpu.total_gib * GIB), int(gpu.used_gib * GIB)
        if version is None:  # v1: "used" includes what the driver reserves
            reserved = int(gpu.reserved_gib * GIB)
            return types.SimpleNamespace(
                total=total, used=used + reserved, free=total - used - reserved
            )
        reserved = int(gpu.reserved_gib * GIB)
        return types.SimpleNamespace(
            total=total, reserved=reserved, used=used, free=total - reserved - used
        )

    def _processes(self, handle: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=pid, usedGpuMemory=int(gib * GIB))
            for pid, gib in self.gpus[handle].processes.items()
        ]

    def _mig(self, handle: int) -> tuple[int, int]:
        return (1, 1) if self.gpus[handle].mig else (0, 0)

    def _p2p(self, a: int, b: int, index: int) -> int:
        return 0 if self.links.get((min(a, b), max(a, b))) == NVLINK else 2

    def _ancestor(self, a: int, b: int) -> int:
        link = self.links.get((min(a, b), max(a, b)), 50)
        return 10 if link == NVLINK else int(link)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> SimulatedNVML:
    simulated = SimulatedNVML([Gpu() for _ in range(4)])

    def install() -> None:
        monkeypatch.setitem(sys.modules, "pynvml", simulated.module())

    install()
    simulated.reinstall = install  # type: ignore[attr-defined]
    return simulated


def test_a_gpus_size_is_cudas_total_not_nvmls(nvml: SimulatedNVML) -> None:
    inventory = scan_gpus({}).inventory
    assert inventory is not None
    assert inventory.devices[0].total_gib == pytest.approx(79.1)


def test_without_nvml_v2_the_total_is_nvmls(nvml: SimulatedNVML) -> None:
    nvml.v2 = False
    nvml.reinstall()  # type: ignore[attr-defined]
    inventory = scan_gpus({}).inventory
    assert inventory is not None and inventory.devices[0].total_gib == pytest.approx(79.65)


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("2,0", [0, 2]),
        ("GPU-0003-uuid,1", [1, 3]),
        ("GPU-0001", [1]),  # a UUID prefix, as CUDA accepts
        ("1,7,2", [1]),  # CUDA ignores everything from the first entry that is not valid
    ],
)
def test_the_operators_cuda_visible_devices_is_honoured(
    nvml: SimulatedNVML, visible: str, expected: list[int]
) -> None:
    inventory = scan_gpus({"CUDA_VISIBLE_DEVICES": visible}).inventory
    assert inventory is not None
    assert [d.index for d in inventory.devices] == expected


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        ("", "leaves no GPU of this host visible"),
        ("-1", "leaves no GPU of this host visible"),
        ("MIG-1234", "names a MIG instance"),
    ],
)
def test_cuda_visible_devices_that_leaves_nothing_usable_is_refused(
    nvml: SimulatedNVML, visible: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        scan_gpus({"CUDA_VISIBLE_DEVICES": visible})


def test_indices_on_a_mixed_host_need_pci_order(nvml: SimulatedNVML) -> None:
    nvml.gpus[3] = Gpu(name="NVIDIA L40S", total_gib=45.0)
    nvml.reinstall()  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        scan_gpus({"CUDA_VISIBLE_DEVICES": "0,3"})
    inventory = scan_gpus({"CUDA_VISIBLE_DEVICES": "0,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert inventory.inventory is not None
    assert [d.name for d in inventory.inventory.devices] == ["NVIDIA H100 80GB HBM3", "NVIDIA L40S"]


def test_a_gpu_in_mig_mode_is_left_out_with_a_warning(
    nvml: SimulatedNVML, caplog: pytest.LogCaptureFixture
) -> None:
    # Importing vLLM elsewhere in the session raises the root level to ERROR: ask for warnings.
    caplog.set_level(logging.WARNING, logger="appliance.host.inventory")
    nvml.gpus[1].mig = True
    inventory = scan_gpus({}).inventory
    assert inventory is not None
    assert [d.index for d in inventory.devices] == [0, 2, 3]
    assert "gpu1 is in MIG mode" in caplog.text


def test_links_between_gpus_are_ranked(nvml: SimulatedNVML) -> None:
    nvml.links = {(0, 1): NVLINK, (2, 3): NVLINK, (0, 2): 30, (1, 3): 50}
    inventory = scan_gpus({}).inventory
    assert inventory is not None
    assert inventory.link(1, 0) == LINK_NVLINK
    assert inventory.link(0, 2) == 3  # across a host bridge
    assert inventory.link(1, 3) == 5  # across CPU sockets
    assert inventory.link(0, 3) == 5  # not reported: taken as the slowest


def test_the_cuda_build_without_a_gpu_is_refused_not_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ConfigError, match="CUDA build is installed but no GPU can be used"):
        detect_inventory(8.0, cuda_build=True)
    assert detect_inventory(8.0, cuda_build=False).kind.value == "cpu"


def test_the_monitor_opens_nvml_once_for_many_readings(nvml: SimulatedNVML) -> None:
    nvml.gpus[0].used_gib = 30.0
    monitor = GpuMonitor()
    for _ in range(20):
        readings = monitor.read()
    assert nvml.inits == 1
    assert readings[0].used_gib == pytest.approx(30.55)  # as nvidia-smi shows it
    assert monitor.free_gib()[0] == pytest.approx(79.65 - 0.55 - 30.0)
    monitor.close()
    monitor.read()
    assert nvml.inits == 2


def test_the_monitor_reports_only_the_inventorys_gpus(nvml: SimulatedNVML) -> None:
    """GPUs in MIG mode or hidden by CUDA_VISIBLE_DEVICES are not the appliance's to report."""
    nvml.gpus[3].mig = True
    inventory = scan_gpus({"CUDA_VISIBLE_DEVICES": "0,2,3"}).inventory  # 3 left out: MIG
    assert inventory is not None
    monitor = GpuMonitor([d.index for d in inventory.devices])
    assert [r.index for r in monitor.read()] == [0, 2]
    assert sorted(monitor.free_gib()) == [0, 2]
    assert [r.index for r in GpuMonitor().read()] == [0, 1, 2, 3]  # unfiltered: every GPU


def test_the_monitor_lists_each_gpus_processes(nvml: SimulatedNVML) -> None:
    nvml.gpus[0].used_gib = 41.0
    nvml.gpus[0].processes = {4242: 40.5}
    usage = GpuMonitor([0, 1]).usage()
    assert sorted(usage) == [0, 1]
    assert usage[0].processes == {4242: pytest.approx(40.5)}
    assert usage[1].processes == {}
