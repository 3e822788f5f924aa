"""The doctor's measured tensor-parallel overhead (NCCL + vLLM's custom all-reduce) reaching
placement: recorded beside the catalogue, read back for this host's GPUs only, and raising
the per-GPU headroom of tensor-parallel engines. The measurement is simulated (the figures a
rank process reports on a GPU box); no GPU is needed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from appliance import doctor
from appliance.doctor import Status, judge_tp_overheads, tp_measurement
from appliance.host import tp_overheads
from appliance.host.inventory import Device, DeviceKind, GpuScan, Inventory, cpu_inventory
from appliance.host.placement import Demand, PlacementError, PlacementPolicy, place
from appliance.host.tp_overheads import TpOverhead

GIB = 1 << 30
UUIDS = ("GPU-aaaa", "GPU-bbbb")


def gpus(*sizes: float, uuids: tuple[str, ...] = UUIDS) -> Inventory:
    return Inventory(
        tuple(
            Device(i, "H100", size, DeviceKind.GPU, uuid)
            for i, (size, uuid) in enumerate(zip(sizes, uuids, strict=True))
        )
    )


def rank(nccl_gib: float, custom_gib: float, *, container: bool = False) -> dict[str, Any]:
    """One rank's figures as ``doctor_probes.nccl_rank`` reports them."""
    own = 0 if container else 1
    return {
        "nccl": int(nccl_gib * GIB) * own,
        "nccl_device": int(nccl_gib * GIB),
        "custom_ar": int(custom_gib * GIB) * own,
        "custom_ar_device": int(custom_gib * GIB),
        "custom_ar_state": "on",
    }


def test_the_measurement_raises_tp_headroom_for_engines_it_covers_never_lowers_it() -> None:
    policy = PlacementPolicy(tp_headroom_gib=0.5, measured_tp_gib=1.25, measured_world=4)
    assert policy.headroom(1, DeviceKind.GPU) == 1.0  # no collectives without TP
    assert policy.headroom(2, DeviceKind.GPU) == 2.25
    assert policy.headroom(4, DeviceKind.GPU) == 2.25
    assert policy.headroom(8, DeviceKind.GPU) == 1.5  # beyond what was measured: the estimate
    assert policy.headroom(4, DeviceKind.CPU) == 0.0
    smaller = PlacementPolicy(tp_headroom_gib=0.5, measured_tp_gib=0.2, measured_world=2)
    assert smaller.headroom(2, DeviceKind.GPU) == 1.5


def test_placement_of_a_tp_engine_holds_the_measured_figure() -> None:
    host = gpus(24.0, 24.0)
    demand = Demand("tp", tensor_parallel_size=2, memory_gib=22.0)
    estimate = PlacementPolicy()
    fits = place(demand, host, [], default_share=0.9, policy=estimate)
    assert fits.headroom_gib == 1.5 and fits.reserved_gib == (23.5, 23.5)
    # The doctor measured NCCL + custom all-reduce at 1.6 GiB per GPU on these two GPUs:
    # 22 + 1 + 1.6 no longer fits 24, and placement says so instead of vLLM failing at start.
    measured = tp_overheads.with_measurement(estimate, TpOverhead(UUIDS, 1.5, 0.1, "on"), host)
    with pytest.raises(PlacementError):
        place(demand, host, [], default_share=0.9, policy=measured)
    single = place(Demand("one", memory_gib=22.0), host, [], default_share=0.9, policy=measured)
    assert single.headroom_gib == 1.0  # a one-GPU engine makes no collectives


def test_the_record_round_trips_beside_the_catalogue(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    path = tp_overheads.record_path(config)
    assert path == tmp_path / "gpu-overheads.json"
    assert tp_overheads.load(path) is None
    tp_overheads.save(path, TpOverhead(UUIDS, 0.75, 0.0625, "on"))
    back = tp_overheads.load(path)
    assert back is not None and back.uuids == UUIDS and back.measured_at > 0
    assert back.per_gpu_gib == pytest.approx(0.8125) and back.world == 2
    policy = tp_overheads.policy_for(PlacementPolicy(), config, gpus(80.0, 80.0))
    assert (policy.measured_tp_gib, policy.measured_world) == (pytest.approx(0.8125), 2)


def test_a_record_from_other_gpus_or_unreadable_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    # Read at the module's own logger: an earlier test (vLLM's import, the app's logging set-up)
    # may have stopped "appliance" records from reaching the root logger caplog listens on.
    log = tp_overheads.logger
    was = log.level, log.disabled
    log.addHandler(caplog.handler)
    log.setLevel(logging.WARNING)
    log.disabled = False

    def restore() -> None:
        log.removeHandler(caplog.handler)
        log.setLevel(was[0])
        log.disabled = was[1]

    request.addfinalizer(restore)
    config = tmp_path / "models.yaml"
    path = tp_overheads.record_path(config)
    tp_overheads.save(path, TpOverhead(UUIDS, 2.0, 0.1, "on"))
    other_box = gpus(80.0, 80.0, uuids=("GPU-cccc", "GPU-dddd"))
    assert tp_overheads.policy_for(PlacementPolicy(), config, other_box) == PlacementPolicy()
    assert "measured on other GPUs" in caplog.text
    cpu = cpu_inventory(8.0)
    assert tp_overheads.policy_for(PlacementPolicy(), config, cpu) == PlacementPolicy()
    path.write_text(json.dumps({"uuids": list(UUIDS)}))  # a field missing
    assert tp_overheads.load(path) is None
    assert "unreadable" in caplog.text


def test_doctor_adds_custom_all_reduce_to_nccl_and_judges_the_largest_rank() -> None:
    policy = PlacementPolicy()  # tp_headroom_gib 0.5
    ok = judge_tp_overheads([rank(0.3, 0.0625), rank(0.35, 0.0625)], policy)
    assert ok.check == "tp overhead (2 GPUs)" and ok.status is Status.OK
    assert "NCCL 0.35 + custom all-reduce 0.06, on" in ok.detail
    # Custom all-reduce pushes rank 1 over the estimate; read by device totals (a container).
    figures = [rank(0.3, 0.0625), rank(0.46, 0.0625, container=True)]
    too_big = judge_tp_overheads(figures, policy)
    assert too_big.status is Status.FAIL and "raise placement.tp_headroom_gib" in too_big.detail
    assert "device total" in too_big.detail
    recorded = judge_tp_overheads(figures, policy, "/srv/gpu-overheads.json")
    assert recorded.status is Status.OK and "placement holds the measurement" in recorded.detail
    measured = tp_measurement(figures, UUIDS)
    assert measured is not None and measured.per_gpu_gib == pytest.approx(0.5225, abs=1e-3)
    broken = [rank(0.3, 0.0), {**rank(0.3, 0.0), "custom_ar_state": "error: RuntimeError('p2p')"}]
    warned = judge_tp_overheads(broken, policy)
    assert warned.status is Status.WARN and "disable_custom_all_reduce" in warned.detail
    assert tp_measurement([rank(0.3, 0.0), {"rank": 1, "error": "NCCL error"}], UUIDS) is None


def test_doctor_records_what_its_ranks_measured_for_placement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """check_gpus on a simulated 2-GPU box: the ranks' figures reach the record, and the
    record reaches the policy ``appliance up`` places with."""
    host = gpus(79.1, 79.1)
    monkeypatch.setattr(doctor, "scan_gpus", lambda environ: GpuScan(host, ""))
    monkeypatch.setattr(doctor, "driver_versions", lambda: ("570.124.06", "12.8"))
    monkeypatch.setattr(doctor, "torch_cuda", lambda: "12.8")

    def child(target: Any, device: str) -> dict[str, Any]:
        if target is doctor.owner_child:
            return {"initialised": False, "uvm": False}
        gib = int(0.5 * GIB)
        return {
            "total": int(79.1 * GIB),
            "free": int(78 * GIB),
            "visible": [device],
            "context": gib,
            "context_device": gib,
            "nccl": None,
        }

    monkeypatch.setattr(doctor, "run_child", child)
    monkeypatch.setattr(doctor, "run_ranks", lambda uuids: [rank(0.9, 0.06), rank(1.1, 0.06)])
    config = tmp_path / "models.yaml"

    def record(measured: TpOverhead) -> str:
        path = tp_overheads.record_path(config)
        tp_overheads.save(path, measured)
        return str(path)

    findings = {f.check: f for f in doctor.check_gpus(PlacementPolicy(), record=record)}
    assert findings["tp overhead (2 GPUs)"].status is Status.OK
    policy = tp_overheads.policy_for(PlacementPolicy(), config, host)
    assert policy.tp_headroom_for(2) == pytest.approx(1.16, abs=0.01)
