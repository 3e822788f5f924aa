"""`models plan`: the supervisor's dry run of a load, on simulated GPUs; nothing changes."""

from __future__ import annotations

import pytest

from appliance.cli.plan_cmd import plan_lines
from appliance.errors import InsufficientResourcesError
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from tests.supervisor.test_gpu_lifecycle import RecordingMaker, entry, run

S = ModelState


def test_plan_names_devices_and_evictions_and_changes_nothing() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", evictable=True, resources={"memory_share": 0.5}),
                entry("b", resources={"memory_share": 0.45}),
                entry("big", autoload=False, resources={"memory_share": 0.6}),
            ]
        )
        await sup.wait_autoload()
        log_before = list(maker.log)
        plan = sup.plan_load("big")
        # a can sleep (sleep mode, room in the host budget): asleep it keeps only its context.
        assert plan.sleep == ["a"] and plan.evict == []
        assert plan.allocation.devices == (sup.get("a").allocation.devices)  # type: ignore[union-attr]
        # Nothing moved: a still ready, big still unloaded, no engine touched.
        assert sup.get("a").state is S.READY and sup.get("big").state is S.UNLOADED
        assert sup.get("big").allocation is None
        assert maker.log == log_before

    run(body, devices=2)


def test_plan_evicts_when_the_host_budget_cannot_take_a_sleeper() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", evictable=True, resources={"memory_share": 0.5}),
                entry("big", autoload=False, resources={"memory_share": 0.6}),
            ]
        )
        await sup.wait_autoload()
        plan = sup.plan_load("big")
        assert plan.sleep == [] and plan.evict == ["a"]
        assert sup.get("a").state is S.READY

    run(body, host_budget=0.5)


def test_plan_of_a_placed_model_is_its_own_allocation() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start([entry("a", resources={"memory_share": 0.5})])
        await sup.wait_autoload()
        plan = sup.plan_load("a")
        assert plan.allocation == sup.get("a").allocation and plan.evict == []

    run(body)


def test_plan_of_a_model_that_cannot_fit_says_why() -> None:
    async def body(sup: Supervisor, maker: RecordingMaker) -> None:
        await sup.start(
            [
                entry("a", resources={"memory_share": 0.6}),
                entry("b", autoload=False, resources={"memory_share": 0.6}),
            ]
        )
        await sup.wait_autoload()
        with pytest.raises(InsufficientResourcesError):
            sup.plan_load("b")
        assert sup.get("b").state is S.UNLOADED

    run(body)


def test_plan_lines() -> None:
    body = {
        "name": "big",
        "state": "unloaded",
        "fits": True,
        "placed_already": False,
        "devices": [{"label": "gpu1", "reserved_gib": 48.4, "total_gib": 79.1}],
        "evict": [{"name": "a", "state": "ready", "memory_gib": 40.5}],
        "files": {"present": False, "size_bytes": 0},
    }
    assert plan_lines(body) == [
        "big (unloaded): would load on gpu1 48.4 of 79.1 GiB",
        "evicts: a (ready, 40.5 GiB)",
        "files on disk: no (a load downloads them first)",
    ]
    refused = {"name": "big", "fits": False, "reason": "model big needs 90 GiB"}
    assert plan_lines(refused) == ["big: would not fit now: model big needs 90 GiB"]


def test_plan_lines_name_the_sleepers() -> None:
    body = {
        "name": "big",
        "state": "unloaded",
        "fits": True,
        "devices": [{"label": "gpu0", "reserved_gib": 49.0, "total_gib": 80.0}],
        "sleep": [{"name": "a", "level": 1, "memory_gib": 41.0}],
        "evict": [],
    }
    assert plan_lines(body) == [
        "big (unloaded): would load on gpu0 49.0 of 80.0 GiB",
        "sleeps (level 1, weights to host RAM): a (41.0 GiB)",
        "evicts: nothing",
    ]
