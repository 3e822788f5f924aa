"""How many CPUs this process may really use: affinity and the container's CPU quota.

``os.cpu_count()`` counts the host's CPUs; inside a container limited with ``--cpus=4`` (a
cgroup quota) or ``--cpuset-cpus`` (affinity) that over-counts, and a worker count sized from
it would oversubscribe the cores the engines' schedulers need.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def quota_cpus(
    cpu_max: str | None, v1_quota: str | None = None, v1_period: str | None = None
) -> float | None:
    """CPUs a cgroup quota allows (``cpu.max`` "QUOTA PERIOD", or v1's pair); None: no limit."""
    try:
        if cpu_max is not None:
            quota, period = cpu_max.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if v1_quota is not None and v1_period is not None:
            quota_us = int(v1_quota)
            return None if quota_us < 0 else quota_us / int(v1_period)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def usable_cpus(
    affinity: Callable[[], int] | None = None,
    read: Callable[[Path], str | None] | None = None,
) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup quota (rounded up)."""
    count = (affinity or _affinity)()
    reader = read or _read
    quota = quota_cpus(reader(CGROUP_V2_CPU_MAX), reader(CGROUP_V1_QUOTA), reader(CGROUP_V1_PERIOD))
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(count, 1)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
