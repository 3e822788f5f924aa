"""On-demand loads: a key that may not load, too many loads at once, too many a minute.

The supervisor is a table of states here (the gate only reads states); time is a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from appliance.api.load_gate import (
    LoadGate,
    LoadRateLimitedError,
    LoadRefusedError,
    OnDemandLimits,
)
from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.registry_client import CatalogueSource
from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.supervisor.states import ModelState


@dataclass
class Handle:
    name: str
    state: ModelState


class Supervisor:
    def __init__(self, **states: ModelState) -> None:
        self.table = {name: Handle(name, state) for name, state in states.items()}

    def get(self, name: str) -> Handle:
        return self.table[name]

    def handles(self) -> list[Handle]:
        return list(self.table.values())


class Router:
    def __init__(self, supervisor: Supervisor) -> None:
        specs = [
            LocalModelSpec(name=n, source=f"org/{n}", load_on_demand=True, autoload=False)
            for n in supervisor.table
        ]
        specs.append(LocalModelSpec(name="fixed", source="org/fixed"))
        specs.append(RemoteModelSpec(name="remote", backend_url="http://box-a:8000"))
        self.catalogue = Catalogue(specs, CatalogueSource.FILE)
        self.supervisor = supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(supervisor: Supervisor, clock: Clock, **limits: Any) -> LoadGate:
    return LoadGate(Router(supervisor), OnDemandLimits(**limits), clock=clock)  # type: ignore[arg-type]


def test_a_key_that_may_not_load_is_refused_with_retry_after() -> None:
    supervisor = Supervisor(a=ModelState.UNLOADED, b=ModelState.READY)
    loads = gate(supervisor, Clock())
    with pytest.raises(LoadRefusedError) as caught:
        loads.check("a", may_load=False)
    assert caught.value.status_code == 503 and caught.value.retry_after
    assert "may not load" in caught.value.message
    loads.check("b", may_load=False)  # loaded: nothing to start
    loads.check("remote", may_load=False)
    loads.check("fixed", may_load=False)
    loads.check("unknown", may_load=False)  # the route's 404


def test_loads_at_once_are_capped() -> None:
    supervisor = Supervisor(a=ModelState.UNLOADED, b=ModelState.LOADING)
    loads = gate(supervisor, Clock(), max_concurrent_loads=1)
    with pytest.raises(LoadRefusedError, match="loading already"):
        loads.check("a", may_load=True)
    supervisor.table["b"].state = ModelState.READY
    loads.check("a", may_load=True)


def test_a_load_evict_loop_hits_the_per_minute_cap() -> None:
    supervisor = Supervisor(a=ModelState.UNLOADED, b=ModelState.UNLOADED)
    clock = Clock()
    loads = gate(supervisor, clock, loads_per_minute=3)
    for name in ("a", "b", "a"):
        loads.check(name, may_load=True)  # each evicts the other, in a loop
        clock.now += 1
    with pytest.raises(LoadRateLimitedError) as caught:
        loads.check("b", may_load=True)
    assert caught.value.status_code == 429 and 0 < (caught.value.retry_after or 0) <= 60
    assert "3 on-demand loads" in caught.value.message
    clock.now += 60
    loads.check("b", may_load=True)
