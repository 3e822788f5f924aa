"""One place for each default: `appliance up`'s options show and use the settings' own."""

from __future__ import annotations

import inspect

from appliance.cli.up_cmd import up
from appliance.settings import (
    FanOutLimits,
    OnDemandLimits,
    Settings,
    StoredResponseLimits,
    StructuredOutputLimits,
)
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
    fan_out, structured, stored = FanOutLimits(), StructuredOutputLimits(), StoredResponseLimits()
    assert options["max_n"] == fan_out.max_n
    assert options["max_batch_items"] == fan_out.max_batch_items
    assert options["max_schema_bytes"] == structured.max_schema_bytes
    assert options["max_regex_repeat"] == structured.max_regex_repeat
    assert options["max_stored_responses"] == stored.max_stored
    assert options["stored_response_age"] == stored.max_age_seconds
