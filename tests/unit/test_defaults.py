"""One place for each default: `appliance up`'s options show and use the settings' own."""

from __future__ import annotations

import inspect

from appliance.cli.up_cmd import up
from appliance.settings import OnDemandLimits, Settings
from appliance.supervisor.handle import SupervisorLimits


def test_up_options_default_to_the_settings_defaults() -> None:
    options = {name: p.default.default for name, p in inspect.signature(up).parameters.items()}
    limits, on_demand = SupervisorLimits(), OnDemandLimits()
    settings = Settings(cpu_memory_budget_gib=1.0)
    assert options["load_wait"] == limits.load_wait_seconds
    assert options["drain_timeout"] == limits.drain_seconds
    assert options["max_queue"] == limits.max_queue
    assert options["restart_tries"] == limits.restart_max_tries
    assert options["restart_backoff"] == limits.restart_backoff_seconds
    assert options["shutdown_grace"] == settings.shutdown_grace_seconds
    assert options["max_connections"] == settings.max_connections
    assert options["max_concurrent_loads"] == on_demand.max_concurrent_loads
    assert options["loads_per_minute"] == on_demand.loads_per_minute
    assert options["list_aliases"] == settings.list_aliases
    assert options["status_page"] == settings.status_page
