"""What an engine asleep still holds on its GPUs, measured around the sleep itself.

vLLM's sleep mode frees only its own memory pool (weights and KV cache, ``CuMemAllocator``):
the CUDA context, NCCL's buffers, cuBLAS workspaces and any allocation made outside the pool
stay, and ``Worker.sleep`` in ``vllm/v1/worker/gpu_worker.py`` logs "Sleep mode freed X GiB
memory, Y GiB memory is still in use", where Y is the whole *device's* use (every engine on
it), not the engine's. So the appliance measures for itself, under the device lock that keeps
other engines' memory still meanwhile:

- where NVML lists the engine's pids on a device, what they hold after the sleep;
- otherwise (inside a container NVML lists host pids), from device totals: the engine's
  reservation there less what the sleep freed (an over-estimate by as much as placement's
  headroom over-estimates its context: the safe side).

Placement then holds that much for the sleeping engine (``Allocation.sleeping``) instead of
assuming only the headroom stays.
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.host.inventory import DeviceUse
from appliance.host.placement import Allocation


def measure_residue(
    allocation: Allocation,
    before: Mapping[int, DeviceUse],
    after: Mapping[int, DeviceUse],
    pids: frozenset[int],
) -> tuple[float, ...] | None:
    """GiB the sleeping engine keeps on each of ``allocation.devices``; None when a device
    could not be read before and after (placement then keeps assuming the headroom)."""
    kept: list[float] = []
    for index in allocation.devices:
        was, now = before.get(index), after.get(index)
        if was is None or now is None:
            return None
        if pids & frozenset(was.processes):
            kept.append(sum(gib for pid, gib in now.processes.items() if pid in pids))
            continue
        freed = max(was.used_gib - now.used_gib, 0.0)
        kept.append(max(allocation.reserved_on(index) - freed, 0.0))
    return tuple(kept)
