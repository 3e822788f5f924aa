"""vLLM's custom all-reduce, built as a tensor-parallel worker builds it, to see what it costs.

Called only inside the doctor's spawned rank processes (``doctor_probes.nccl_rank``), after
NCCL is up and the rank has its CUDA context: vLLM gives every tensor-parallel group of 2, 4,
6, 8 or 16 GPUs a ``CustomAllreduce`` on the group's gloo side
(``CudaCommunicator.__init__``), unless ``disable_custom_all_reduce`` is set or vLLM turns it
off itself (world size it does not support, more than two PCIe-only GPUs, no P2P: each logged
as a warning). It allocates its IPC buffers at construction, before the worker's memory check,
so what it takes is headroom placement must hold (``host.tp_overheads``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def custom_all_reduce_cost(rank: int, used: Callable[[], tuple[int, int]]) -> dict[str, Any]:
    """Build vLLM's custom all-reduce for this rank of the default (NCCL) process group and
    run one all-reduce through it; return what it took, read by ``used`` as
    ``(own process bytes, device bytes)`` before and after, and whether vLLM kept it on.

    The communicator is closed again before returning, so the rank can measure on."""
    import torch
    import torch.distributed as dist
    from vllm.distributed.device_communicators.custom_all_reduce import CustomAllreduce

    gloo = dist.new_group(backend="gloo")  # vLLM's cpu_group: CustomAllreduce refuses NCCL's
    own_before, device_before = used()
    comm = CustomAllreduce(group=gloo, device=rank)
    try:
        if comm.disabled:
            return {
                "custom_ar": 0,
                "custom_ar_device": 0,
                "custom_ar_state": "off: vLLM disables it on these GPUs (its warning says why)",
            }
        probe = torch.ones(1 << 16, dtype=torch.float16, device=f"cuda:{rank}")
        comm.custom_all_reduce(probe)
        torch.cuda.synchronize()
        own_after, device_after = used()
        return {
            "custom_ar": own_after - own_before,
            "custom_ar_device": device_after - device_before,
            "custom_ar_state": "on",
        }
    finally:
        comm.close()
        dist.destroy_process_group(gloo)
