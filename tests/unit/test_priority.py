"""Priorities from the keys file and per request (``api_keys``, ``api.priority``)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from appliance.api.auth import KEY_SCOPE, key_identity
from appliance.api.auth_file import load_auth_config
from appliance.api.fair_access import places_in_engine
from appliance.api.priority import request_priority
from appliance.api_keys import PRIORITY_LAST, ApiKey
from appliance.batches.settings import BATCH_SCOPE
from appliance.catalogue.schema import LocalModelSpec
from appliance.errors import ConfigError, InvalidRequestError
from appliance.supervisor.fair_queue import FairShareSettings

SECRET = "sk-0123456789abcdef0123456789abcdef"


def scope_of(**key: Any) -> dict[str, Any]:
    return {KEY_SCOPE: key_identity(ApiKey(key=SECRET, name="team", **key))}


def test_a_key_runs_at_its_priority_and_may_lower_but_not_raise_it() -> None:
    scope = scope_of(priority=5)
    assert request_priority(scope, {}) == 5
    assert request_priority(scope, {"priority": 50}) == 50
    with pytest.raises(InvalidRequestError, match="5 \\(most urgent\\)") as refused:
        request_priority(scope, {"priority": 4})
    assert refused.value.param == "priority"


def test_priority_range_bounds_what_a_request_may_ask() -> None:
    scope = scope_of(priority=0, priority_range=(-10, 10))
    assert request_priority(scope, {"priority": -10}) == -10
    for wrong in (11, -11, "1", 1.5, True):
        with pytest.raises(InvalidRequestError):
            request_priority(scope, {"priority": wrong})


def test_no_key_may_only_lower_and_batch_lines_run_last() -> None:
    assert request_priority({}, {}) == 0
    assert request_priority({}, {"priority": 3}) == 3
    with pytest.raises(InvalidRequestError, match="without a key"):
        request_priority({}, {"priority": -1})
    batch = {**scope_of(priority=-5), BATCH_SCOPE: "batch_1"}
    assert request_priority(batch, {"priority": -5}) == PRIORITY_LAST


@pytest.mark.parametrize(
    "fields",
    [{"priority": 2000}, {"priority": 3, "priority_range": (0, 2)}, {"priority_range": (5, 1)}],
)
def test_keys_file_priorities_are_checked_at_start(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ApiKey(key=SECRET, name="team", **fields)


def test_places_in_engine_come_from_the_entry_then_the_engine_then_the_default() -> None:
    settings = FairShareSettings(default_in_engine=64)
    plain = LocalModelSpec(name="m", source="/m")
    assert places_in_engine(plain, settings, 1) == 64
    seqs = LocalModelSpec(name="m", source="/m", engine={"max_num_seqs": 8})
    assert places_in_engine(seqs, settings, 1) == 8
    own = LocalModelSpec(name="m", source="/m", engine={"max_num_seqs": 8}, max_in_engine=6)
    assert places_in_engine(own, settings, 4) == 1  # split across 4 HTTP processes
    assert places_in_engine(None, settings, 1) is None


def test_a_bad_priority_in_the_keys_file_is_one_line_naming_the_key(tmp_path: Any) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {{name: team, key: {SECRET}, priority: 5, priority_range: [0, 2]}}\n"
    )
    path.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        load_auth_config(path, {})
    message = refused.value.message
    assert "'team'" in message and "priority" in message and "\n" not in message
    assert SECRET not in message
