"""The doctor's probes: what it reads from NVML and from spawned children that use CUDA.

Nothing here runs CUDA in the calling process: each probe that needs it runs in a child
spawned with the GPUs it may see (as vLLM's engines are), and reports figures back through a
queue; ``appliance.doctor`` judges them. Needs a GPU; the judgements are what is unit-tested.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import socket
import sys
import time
from collections.abc import Callable
from typing import Any


def driver_versions() -> tuple[str | None, str | None]:
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


def torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def run_child(target: Callable[[Any, str], None], device: str) -> dict[str, Any]:
    """Run ``target(queue, device)`` in a spawned process with only ``device`` visible (every
    GPU, as the serving process sees them, when ``device`` is empty)."""
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device:
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


def cuda_child(results: Any, device: str) -> None:
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
            return 0  # not listed: inside a container NVML lists the host's pids

        def device_used() -> int:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

        before = device_used()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        context, context_device = mine(), device_used() - before
        nccl: int | None = None
        nccl_device = 0
        try:
            import torch.distributed as dist

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl", rank=0, world_size=1)
            dist.all_reduce(torch.ones(1, device="cuda"))
            torch.cuda.synchronize()
            time.sleep(0.5)
            nccl = mine() - context
            nccl_device = device_used() - before - context_device
            dist.destroy_process_group()
        except Exception:
            nccl = None
        results.put(
            {
                "total": total,
                "free": free,
                "visible": visible,
                "context": context,
                "context_device": context_device,
                "nccl": nccl,
                "nccl_device": nccl_device,
            }
        )
    except Exception as exc:  # reported, not raised: the parent prints it
        results.put({"error": repr(exc)})


def owner_child(results: Any, device: str) -> None:
    """In a spawned child: import what the serving process imports, then see whether that
    made a CUDA context (it must not: see ``judge_owner_context``)."""
    try:
        import appliance.appliance
        import appliance.engines.vllm.engine  # noqa: F401

        initialised = False
        if "torch" in sys.modules:
            initialised = bool(sys.modules["torch"].cuda.is_initialized())
        uvm = False
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                uvm = uvm or "nvidia-uvm" in os.readlink(f"/proc/self/fd/{fd}")
        results.put({"initialised": initialised, "uvm": uvm})
    except Exception as exc:  # reported, not raised: the parent prints it
        results.put({"error": repr(exc)})


def run_ranks(uuids: list[str], timeout: float = 300.0) -> list[dict[str, Any]]:
    """Run :func:`nccl_rank` on each of ``uuids`` at once (one process per GPU, as vLLM's
    tensor-parallel workers run), and return each rank's figures (or its error)."""
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(uuids)
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    processes = []
    try:
        for rank in range(len(uuids)):
            process = context.Process(target=nccl_rank, args=(results, rank, uuids, port))
            process.start()
            processes.append(process)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    figures: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(figures) < len(uuids):
            figures.append(dict(results.get(timeout=max(deadline - time.monotonic(), 0.1))))
    except queue.Empty:
        figures.append({"error": f"{len(uuids) - len(figures)} rank(s) gave no answer"})
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    return figures


def custom_all_reduce(rank: int, used: Callable[[], tuple[int, int]]) -> dict[str, Any]:
    """vLLM's custom all-reduce on this rank, as its tensor-parallel workers build it (each
    rank of a group reaches here together); a failure is reported, not raised."""
    try:
        from appliance.engines.vllm.collectives import custom_all_reduce_cost

        return custom_all_reduce_cost(rank, used)
    except Exception as exc:
        return {"custom_ar": 0, "custom_ar_device": 0, "custom_ar_state": f"error: {exc!r}"}


def nccl_rank(results: Any, rank: int, uuids: list[str], port: int) -> None:
    """In a spawned child: rank ``rank`` of an NCCL group over ``uuids``; what NCCL and vLLM's
    custom all-reduce cost on this rank's GPU beyond its CUDA context, read as ``cuda_child``
    reads it."""
    try:
        import pynvml
        import torch
        import torch.distributed as dist

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuids[rank])

        def mine() -> int:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
            return 0

        def device_used() -> int:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

        torch.cuda.set_device(rank)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        context, before = mine(), device_used()
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(uuids)
        )
        dist.all_reduce(torch.ones(1 << 20, device="cuda"))
        torch.cuda.synchronize()
        time.sleep(0.5)
        nccl, nccl_device = mine() - context, device_used() - before
        figures: dict[str, Any] = {"rank": rank, "nccl": nccl, "nccl_device": nccl_device}
        figures.update(custom_all_reduce(rank, lambda: (mine(), device_used())))
        dist.barrier()
        dist.destroy_process_group()
        results.put(figures)
    except Exception as exc:  # reported, not raised: the parent prints it
        results.put({"rank": rank, "error": repr(exc)})
