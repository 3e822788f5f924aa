"""Issue 26: the KV-cache and waiting gauges with HTTP workers.

vLLM gives each engine step's SchedulerStats to one client only; a worker's client may hold
the latest. Workers send their snapshots to the owner, which shows the freshest. Recorded
vLLM behaviour (``SchedulerStats``) and plain fakes; the integration test is in
tests/integration/test_workers.py.
"""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

from vllm.v1.metrics.stats import SchedulerStats

from appliance.api_keys import AuthConfig
from appliance.engines.base import EngineStats, SchedulerSnapshot
from appliance.engines.vllm.stats import StatsRecorder
from appliance.errors import ModelNotFoundError
from appliance.supervisor.presenter import Presenter
from appliance.workers.owner import OwnerService
from appliance.workers.scheduler_figures import PeerSnapshots, UnsentSnapshots, snapshot_from


class Engine:
    """An engine whose stats are set by the test."""

    def __init__(self, stats: EngineStats) -> None:
        self.figures = stats

    def stats(self) -> EngineStats:
        return self.figures


def test_the_recorder_stamps_each_scheduler_snapshot_with_its_time() -> None:
    now = [10.0]
    recorder = StatsRecorder("m", clock=lambda: now[0])
    assert recorder.snapshot is None
    recorder.record(SchedulerStats(num_waiting_reqs=3, kv_cache_usage=0.5), None)
    assert recorder.snapshot == SchedulerSnapshot(waiting=3, kv_cache_usage=0.5, at=10.0)
    now[0] = 11.0
    recorder.record(None, None)  # a step whose scheduler figures went to another client
    assert recorder.snapshot == SchedulerSnapshot(waiting=3, kv_cache_usage=0.5, at=10.0)
    recorder.record(SchedulerStats(num_waiting_reqs=0, kv_cache_usage=0.1), None)
    assert recorder.snapshot == SchedulerSnapshot(waiting=0, kv_cache_usage=0.1, at=11.0)


def test_a_worker_sends_each_snapshot_once_and_forgets_closed_clients() -> None:
    latest: dict[str, tuple[str, SchedulerSnapshot]] = {
        "chat": ("7", SchedulerSnapshot(2, 0.25, 5.0))
    }
    unsent = UnsentSnapshots(lambda: latest)
    assert unsent.take() == {
        "chat": {"link_id": "7", "waiting": 2, "kv_cache_usage": 0.25, "at": 5.0}
    }
    assert unsent.take() == {}  # nothing newer came
    latest["chat"] = ("7", SchedulerSnapshot(0, 0.0, 6.0))
    assert unsent.take()["chat"]["at"] == 6.0
    # The model was reloaded: a new link, whose first snapshot goes out even at the same time.
    latest["chat"] = ("8", SchedulerSnapshot(1, 0.5, 6.0))
    assert unsent.take()["chat"]["link_id"] == "8"
    assert unsent._sent == {"8": 6.0}


def test_snapshots_off_the_wire_are_checked() -> None:
    good = {"link_id": "1", "waiting": 1, "kv_cache_usage": 0.5, "at": 3.0}
    assert snapshot_from(good) == SchedulerSnapshot(1, 0.5, 3.0)
    for bad in (
        {},
        {**good, "waiting": "many"},
        {**good, "waiting": -1},
        {**good, "kv_cache_usage": 1.5},
        {**good, "kv_cache_usage": float("nan")},
        {**good, "at": float("inf")},
        {**good, "at": None},
    ):
        assert snapshot_from(bad) is None, bad


def test_the_owner_keeps_the_freshest_snapshot_of_each_engine_only() -> None:
    peers = PeerSnapshots()
    engine = Engine(EngineStats())
    assert peers.latest(engine) is None and peers.latest(None) is None
    peers.offer(engine, SchedulerSnapshot(1, 0.5, 5.0))
    peers.offer(engine, SchedulerSnapshot(9, 0.9, 4.0))  # an older one, sent late
    assert peers.latest(engine) == SchedulerSnapshot(1, 0.5, 5.0)
    peers.offer(engine, SchedulerSnapshot(0, 0.1, 6.0))
    assert peers.latest(engine) == SchedulerSnapshot(0, 0.1, 6.0)
    del engine
    gc.collect()
    assert len(peers._by_engine) == 0  # a replaced engine's figures go with it


def presenter(peer: SchedulerSnapshot | None, workers_running: int = 0) -> Presenter:
    supervisor: Any = SimpleNamespace(
        peer_scheduler=lambda engine: peer,
        peer_running=lambda name: workers_running,
        lending=SimpleNamespace(worker_use=lambda handle: (0, 0)),
    )
    return Presenter(supervisor)


def test_the_gauges_come_from_the_freshest_client() -> None:
    own = SchedulerSnapshot(waiting=4, kv_cache_usage=0.8, at=5.0)
    # Several clients: the owner's engine reports only its own requests and its snapshot.
    handle: Any = SimpleNamespace(name="chat", engine=Engine(EngineStats(running=1, scheduler=own)))
    newer = SchedulerSnapshot(waiting=0, kv_cache_usage=0.125, at=7.0)
    assert presenter(newer, workers_running=2).engine_stats(handle) == EngineStats(
        running=3, waiting=0, kv_cache_usage=0.125, scheduler=newer
    )
    older = SchedulerSnapshot(waiting=9, kv_cache_usage=0.9, at=1.0)
    assert presenter(older).engine_stats(handle) == EngineStats(
        running=1, waiting=4, kv_cache_usage=0.8, scheduler=own
    )
    # No worker sent any: the owner's own snapshot.
    assert presenter(None).engine_stats(handle) == EngineStats(
        running=1, waiting=4, kv_cache_usage=0.8, scheduler=own
    )
    # Only a worker's client got figures so far.
    handle.engine = Engine(EngineStats(running=0))
    assert presenter(newer).engine_stats(handle) == EngineStats(
        running=0, waiting=0, kv_cache_usage=0.125, scheduler=newer
    )
    # No figures anywhere (a remote backend): no gauges made up.
    assert presenter(None).engine_stats(handle) == EngineStats(running=0)
    handle.engine = None
    assert presenter(newer).engine_stats(handle) is None


def test_the_owner_takes_a_workers_snapshot_of_the_engine_it_runs_now() -> None:
    engine = Engine(EngineStats())
    handles = {"chat": SimpleNamespace(engine=engine), "idle": SimpleNamespace(engine=None)}

    def get(name: str) -> Any:
        if name not in handles:
            raise ModelNotFoundError(f"no {name}")
        return handles[name]

    supervisor: Any = SimpleNamespace(get=get)
    router: Any = SimpleNamespace(supervisor=supervisor)
    owner = OwnerService(
        router=router,
        access=None,  # type: ignore[arg-type]
        auth=AuthConfig(),
        key_limits={},
        metrics=None,  # type: ignore[arg-type]
        observers=(),
    )
    owner._encoded[engine] = ("3", "link")
    sent = {"link_id": "3", "waiting": 2, "kv_cache_usage": 0.5, "at": 8.0}
    schedulers = {
        "chat": sent,
        "idle": sent,  # no engine now
        "gone": sent,  # removed from the catalogue
    }
    asyncio.run(owner.observe(None, {"schedulers": schedulers}))  # type: ignore[arg-type]
    assert supervisor.peer_scheduler(engine) == SchedulerSnapshot(2, 0.5, 8.0)
    # A snapshot of the engine a reload replaced (another link) is not this engine's.
    stale = {"chat": {**sent, "link_id": "2", "at": 9.0}, "bad": "x"}
    asyncio.run(owner.observe(None, {"schedulers": stale}))  # type: ignore[arg-type]
    assert supervisor.peer_scheduler(engine) == SchedulerSnapshot(2, 0.5, 8.0)
