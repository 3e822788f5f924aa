"""On-demand loads: a key that may not load, too many loads at once, too many a minute.

The supervisor is a table of states here (the gate only reads states); time is a fake clock.
The last test meets the gate through the whole app, as requests do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import ApiKey
from appliance.catalogue.schema import LocalModelSpec
from appliance.errors import ModelNotFoundError
from appliance.host.inventory import cpu_inventory
from appliance.supervisor.load_gate import (
    LoadGate,
    LoadRateLimitedError,
    LoadRefusedError,
    OnDemandLimits,
)
from appliance.supervisor.states import ModelState
from tests.unit.fast_app import fast_settings
from tests.unit.test_app_fast import EchoMaker

LOADER = "sk-loader-0123456789abcdef"
NO_LOAD = "sk-noload-0123456789abcdef"


@dataclass
class Handle:
    name: str
    state: ModelState
    local: LocalModelSpec | None  # None: a remote entry


class Supervisor:
    """The model table: an on-demand entry per state given, one that is not on demand
    (``fixed``, unloaded) and a remote one."""

    def __init__(self, **states: ModelState) -> None:
        self.table = {
            name: Handle(name, state, on_demand(name, True)) for name, state in states.items()
        }
        self.table["fixed"] = Handle("fixed", ModelState.UNLOADED, on_demand("fixed", False))
        self.table["remote"] = Handle("remote", ModelState.READY, None)

    def get(self, name: str) -> Handle:
        if name not in self.table:
            raise ModelNotFoundError(f"no {name!r}")
        return self.table[name]

    def handles(self) -> list[Handle]:
        return list(self.table.values())


def on_demand(name: str, load_on_demand: bool) -> LocalModelSpec:
    return LocalModelSpec(
        name=name, source=f"org/{name}", load_on_demand=load_on_demand, autoload=False
    )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(supervisor: Supervisor, clock: Clock, **limits: Any) -> LoadGate:
    return LoadGate(supervisor, OnDemandLimits(**limits), clock=clock)  # type: ignore[arg-type]


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
    loads.check("unknown", may_load=False)  # the lending's 404


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


def test_the_gate_is_met_through_every_routes_lease(tmp_path: Path) -> None:
    """The app lends through the gate: an OpenAI route and a vLLM one (``/tokenize``) are
    refused for a key that may not load, and nothing loads; a key that may load loads it."""
    entry = {"name": "lazy", "source": "org/lazy", "resources": {"memory_gib": 1}}
    keys = [
        ApiKey.model_validate({"name": "loader", "key": LOADER}),
        ApiKey.model_validate({"name": "stay", "key": NO_LOAD, "may_load": False}),
    ]
    settings = fast_settings(tmp_path, [{**entry, "autoload": False, "load_on_demand": True}], keys)
    app = create_app(settings, engines=EchoMaker(), inventory=cpu_inventory(4))
    body = {"model": "lazy", "prompt": "hi"}
    with TestClient(app) as client:
        supervisor = app.state.appliance.supervisor
        for path in ("/v1/completions", "/tokenize"):
            refused = client.post(path, json=body, headers={"Authorization": f"Bearer {NO_LOAD}"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "load_refused"
            assert refused.headers["retry-after"]
        assert supervisor.get("lazy").state is ModelState.UNLOADED
        loaded = client.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {LOADER}"}
        )
        assert loaded.status_code == 200, loaded.text
        assert supervisor.get("lazy").state is ModelState.READY
