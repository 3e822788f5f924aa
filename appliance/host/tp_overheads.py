"""What a tensor-parallel rank takes on its GPU for its collectives, measured by the doctor.

A tensor-parallel vLLM worker creates its communicators in ``init_device``
(``init_worker_distributed_environment`` in ``vllm/v1/worker/gpu_worker.py``) *before* it
takes its memory snapshot and checks ``gpu_memory_utilization``: NCCL's buffers and vLLM's
custom all-reduce (``CustomAllreduce`` in ``device_communicators/custom_all_reduce.py``: an IPC
metadata buffer of ``meta_size() + max_size`` (8 MiB), an IPC data buffer of 16 MiB, 8 MiB of
``rank_data``, and on Blackwell the MNNVL buffers; peers' buffers are mapped, not allocated)
sit outside the budget, so placement's per-GPU headroom must hold them. The README's 0.5 GiB
is an estimate; ``appliance doctor`` measures both across every GPU it sees and records the
largest rank here, beside the catalogue; ``appliance up`` reads it back and placement raises
its tensor-parallel headroom to it (``PlacementPolicy.tp_headroom_for``).

The record names the GPUs it was measured on: on another set (a changed box, another
``CUDA_VISIBLE_DEVICES``) it does not apply, and placement keeps the estimate.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from appliance.host.inventory import DeviceKind, Inventory
from appliance.host.placement import PlacementPolicy

logger = logging.getLogger(__name__)

# Beside the catalogue, as usage.db is: the doctor and `up` both know the catalogue's path.
RECORD_NAME = "gpu-overheads.json"


@dataclass(frozen=True)
class TpOverhead:
    """One measurement: the largest rank's cost across ``uuids`` (one rank per GPU)."""

    uuids: tuple[str, ...]
    nccl_gib: float
    custom_all_reduce_gib: float
    custom_all_reduce: str  # "on", or why vLLM keeps it off on these GPUs
    measured_at: float = 0.0

    @property
    def world(self) -> int:
        """How many GPUs the measurement spanned."""
        return len(self.uuids)

    @property
    def per_gpu_gib(self) -> float:
        """What placement holds per GPU for a tensor-parallel engine's collectives."""
        return self.nccl_gib + self.custom_all_reduce_gib


def record_path(config_path: Path) -> Path:
    """Where the measurement for the catalogue at ``config_path`` is kept."""
    return config_path.resolve().parent / RECORD_NAME


def save(path: Path, overhead: TpOverhead) -> None:
    """Write ``overhead`` to ``path`` (replacing an earlier measurement at once)."""
    data = asdict(replace(overhead, measured_at=overhead.measured_at or time.time()))
    part = path.with_suffix(".part")
    part.write_text(json.dumps(data, indent=2) + "\n")
    part.replace(path)


def load(path: Path) -> TpOverhead | None:
    """The measurement at ``path``; None when there is none or it cannot be read (logged)."""
    try:
        data = json.loads(path.read_text())
        return TpOverhead(
            uuids=tuple(str(u) for u in data["uuids"]),
            nccl_gib=float(data["nccl_gib"]),
            custom_all_reduce_gib=float(data["custom_all_reduce_gib"]),
            custom_all_reduce=str(data["custom_all_reduce"]),
            measured_at=float(data.get("measured_at", 0.0)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning(
            "%s is unreadable (%s): tensor-parallel headroom stays the estimate", path, exc
        )
        return None


def with_measurement(
    policy: PlacementPolicy, overhead: TpOverhead | None, inventory: Inventory
) -> PlacementPolicy:
    """``policy`` with the doctor's measurement, when it was taken on this host's GPUs."""
    if overhead is None or overhead.world < 2 or inventory.kind is not DeviceKind.GPU:
        return policy
    here = {d.uuid for d in inventory.devices if d.uuid}
    if not set(overhead.uuids) <= here:
        logger.warning(
            "the recorded tensor-parallel overhead was measured on other GPUs (%s): run "
            "`appliance doctor` again; placement keeps placement.tp_headroom_gib",
            ", ".join(overhead.uuids),
        )
        return policy
    return replace(policy, measured_tp_gib=overhead.per_gpu_gib, measured_world=overhead.world)


def policy_for(policy: PlacementPolicy, config_path: Path, inventory: Inventory) -> PlacementPolicy:
    """``policy`` with whatever the doctor recorded beside the catalogue at ``config_path``."""
    return with_measurement(policy, load(record_path(config_path)), inventory)
