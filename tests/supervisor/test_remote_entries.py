"""Remote backends in the supervisor's table: the same queue limit, in-flight count, states
and status as local models, with the backend's health as the state."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.catalogue.schema import RemoteModelSpec, parse_model_spec
from appliance.errors import LifecycleError, ModelNotFoundError, RateLimitedError
from appliance.host.inventory import cpu_inventory
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.states import ModelState, Transition
from appliance.supervisor.supervisor import Supervisor
from tests.fakes import FakeBackend, FakeMaker
from tests.supervisor.test_supervisor import Recorder

LIMITS = SupervisorLimits(watch_interval_seconds=0.02, max_queue=8)


class FakeRemotes:
    """One FakeBackend per remote entry."""

    def __init__(self) -> None:
        self.backends: dict[str, FakeBackend] = {}

    def get(self, spec: RemoteModelSpec) -> FakeBackend:
        return self.backends.setdefault(spec.name, FakeBackend())

    def health(self, spec: RemoteModelSpec) -> dict[str, Any]:
        up = self.get(spec).alive
        return {"up": up, "breaker": "closed" if up else "open", "last_error": None}


def far(**extra: Any) -> RemoteModelSpec:
    spec = parse_model_spec({"name": "far", "backend_url": "http://box-a:8000", **extra})
    assert isinstance(spec, RemoteModelSpec)
    return spec


def run(body: Any) -> None:
    async def main() -> None:
        remotes = FakeRemotes()
        recorder = Recorder()
        supervisor = Supervisor(
            cpu_inventory(8), FakeMaker(), limits=LIMITS, observer=recorder, remotes=remotes
        )
        try:
            await body(supervisor, remotes, recorder)
        finally:
            await supervisor.shutdown()

    asyncio.run(main())


def test_a_remote_entry_is_in_the_table_ready_and_counts_in_flight() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        await sup.start([far()])
        assert [h.name for h in sup.handles()] == ["far"]
        assert sup.state_of("far") is ModelState.READY
        async with sup.acquire("far") as engine:
            assert engine is remotes.backends["far"]
            assert sup.describe("far")["in_flight"] == 1
        status = sup.describe("far")
        assert status["in_flight"] == 0 and status["kind"] == "remote"
        assert status["backend_url"] == "http://box-a:8000" and status["breaker"] == "closed"
        assert sup.all_ready()  # nothing to load: /ready does not wait for backends

    run(body)


def test_a_remote_entry_gets_the_per_model_queue_limit() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        await sup.start([far(max_queue=2)])
        async with sup.acquire("far"), sup.acquire("far"):
            with pytest.raises(RateLimitedError) as caught:
                async with sup.acquire("far"):
                    pass
            assert caught.value.retry_after == 1
        async with sup.acquire("far"):
            pass  # room again once the two ended

    run(body)


def test_a_backend_that_stops_answering_is_unavailable_then_ready_again() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        await sup.start([far()])
        handle = sup.get("far")
        remotes.get(far()).alive = False
        await asyncio.wait_for(handle.lifecycle.wait_for(ModelState.UNAVAILABLE, None), 5)
        assert sup.describe("far")["state"] == "unavailable"
        remotes.get(far()).alive = True
        await asyncio.wait_for(handle.lifecycle.wait_for(ModelState.READY, None), 5)
        moves = [(t.old.value, t.new.value) for t in rec.transitions if isinstance(t, Transition)]
        assert moves == [("ready", "unavailable"), ("unavailable", "ready")]

    run(body)


def test_lifecycle_commands_on_a_remote_entry_are_a_clear_409() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        await sup.start([far()])
        for command in (sup.load("far"), sup.unload("far"), sup.sleep("far"), sup.wake("far")):
            with pytest.raises(LifecycleError, match="remote backend"):
                await command
        with pytest.raises(ModelNotFoundError):
            sup.get("nowhere")

    run(body)


def test_a_catalogue_change_moves_remote_entries_without_touching_local_ones() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        local = parse_model_spec({"name": "near", "source": "org/near", "autoload": False})
        await sup.start([local, far()])
        changes = await sup.apply_catalogue([local, far(backend_url="http://box-b:8000")])
        assert changes == {"added": [], "removed": [], "changed": ["far"]}
        assert sup.describe("far")["backend_url"] == "http://box-b:8000"
        changes = await sup.apply_catalogue([local])
        assert changes["removed"] == ["far"] and [h.name for h in sup.handles()] == ["near"]

    run(body)


def test_aliases_resolve_to_their_entry_and_list_its_names() -> None:
    async def body(sup: Supervisor, remotes: FakeRemotes, rec: Recorder) -> None:
        await sup.start([far(aliases=["gpt-4o-mini", "fast"])])
        assert sup.resolve("far") == sup.resolve("gpt-4o-mini") == "far"
        assert sup.names_of("fast") == ["far", "gpt-4o-mini", "fast"]
        assert sup.names_of("nowhere") == []
        with pytest.raises(ModelNotFoundError):
            sup.resolve("nowhere")
        assert sup.describe("far")["aliases"] == ["gpt-4o-mini", "fast"]
        # New aliases for the same entry: the entry stays (no restart), the names move.
        handle = sup.get("far")
        changes = await sup.apply_catalogue([far(aliases=["slow"])])
        assert changes["changed"] == [] and sup.get("far") is handle
        assert sup.resolve("slow") == "far"
        with pytest.raises(ModelNotFoundError):
            sup.resolve("fast")

    run(body)
