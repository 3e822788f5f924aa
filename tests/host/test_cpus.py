"""The default worker count's core count: affinity (--cpuset-cpus) and cgroup quotas
(--cpus), not the host's os.cpu_count()."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.host.cpus import (
    CGROUP_V1_PERIOD,
    CGROUP_V1_QUOTA,
    CGROUP_V2_CPU_MAX,
    quota_cpus,
    usable_cpus,
)
from appliance.settings import default_http_workers


@pytest.mark.parametrize(
    ("cpu_max", "v1", "cpus"),
    [
        ("max 100000", None, None),
        ("400000 100000", None, 4.0),  # docker --cpus=4
        ("150000 100000", None, 1.5),
        (None, ("-1", "100000"), None),  # cgroup v1, no quota
        (None, ("200000", "100000"), 2.0),
        ("garbage", None, None),
        (None, None, None),
    ],
)
def test_cgroup_quotas(cpu_max: str | None, v1: tuple[str, str] | None, cpus: float | None) -> None:
    assert quota_cpus(cpu_max, *(v1 or (None, None))) == cpus


def reader(files: dict[Path, str]) -> object:
    return lambda path: files.get(path)


def test_a_container_quota_caps_the_affinity() -> None:
    """A 64-core host, a container with --cpus=6: six cores, so at most one worker."""
    cores = usable_cpus(lambda: 64, reader({CGROUP_V2_CPU_MAX: "600000 100000"}))  # type: ignore[arg-type]
    assert cores == 6
    assert default_http_workers(gpus=8, cores=cores) == 1
    assert default_http_workers(gpus=8, cores=64) == 8  # what os.cpu_count() would have given


def test_affinity_counts_when_there_is_no_quota() -> None:
    assert usable_cpus(lambda: 12, reader({CGROUP_V2_CPU_MAX: "max 100000"})) == 12  # type: ignore[arg-type]
    v1 = {CGROUP_V1_QUOTA: "250000", CGROUP_V1_PERIOD: "100000"}
    assert usable_cpus(lambda: 12, reader(v1)) == 3  # type: ignore[arg-type]  # 2.5 rounds up


def test_this_box() -> None:
    assert 1 <= usable_cpus() <= 4096
