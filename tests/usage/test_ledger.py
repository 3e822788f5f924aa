"""The usage ledger: counts per key and model, bounded labels, stored totals, quotas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.api.middleware import RequestInfo
from appliance.engines.base import Usage
from appliance.errors import QuotaExceededError
from appliance.usage.ledger import UsageLedger
from appliance.usage.quotas import QuotaConfig
from appliance.usage.store import Counts, UsageStore

MODELS = {"chat", "embed"}
NOON = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def info(model: str | None, key: str | None, usage: Usage | None = None) -> RequestInfo:
    found = RequestInfo(request_id="r", model=model, endpoint="chat/completions", usage=usage)
    if key is not None:
        found.extra["key"] = key
    return found


@pytest.fixture
def make_ledger(tmp_path: Path) -> Callable[..., UsageLedger]:
    """A ledger over a store in ``tmp_path``, keys alice and ops, a fresh registry each."""

    def make(
        quotas: dict[str, dict[str, int]] | None = None,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
    ) -> UsageLedger:
        return UsageLedger(
            UsageStore(tmp_path / "usage.db"),
            key_names=["alice", "ops"],
            quotas=QuotaConfig.model_validate({"quotas": quotas or {}}),
            registry=registry or CollectorRegistry(),
            model_label=lambda name: name if name in MODELS else "",
            now=clock or Clock(NOON),
        )

    return make


def series(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_counts_per_key_and_model(make_ledger: Callable[..., UsageLedger]) -> None:
    registry = CollectorRegistry()
    ledger = make_ledger(registry=registry)
    ledger.on_request_done(info("chat", "alice", Usage(5, 7)), 200, 0.1)
    ledger.on_request_done(info("chat", "alice", Usage(1, 2)), 200, 0.1)
    # An error counts as a request, never as tokens (even if a usage was noted).
    ledger.on_request_done(info("chat", "alice", Usage(100, 100)), 400, 0.1)
    ledger.on_request_done(info("embed", None, Usage(3, 0)), 200, 0.1)
    # Not a model request, or a name the catalogue does not hold: not counted.
    ledger.on_request_done(info(None, "alice"), 200, 0.1)
    ledger.on_request_done(info("nope", "alice", Usage(9, 9)), 404, 0.1)
    # A key name that is not configured cannot grow the label set.
    ledger.on_request_done(info("chat", "mallory", Usage(1, 1)), 200, 0.1)

    rows = asyncio.run(ledger.totals())
    assert {(r.key, r.model): r.counts for r in rows} == {
        ("", "chat"): Counts(1, 0, 1, 1),
        ("", "embed"): Counts(1, 0, 3, 0),
        ("alice", "chat"): Counts(3, 1, 6, 9),
    }
    found = series(registry)
    key = frozenset({("key", "alice"), ("model", "chat")})
    assert found[("appliance_key_requests_total", key)] == 3
    assert found[("appliance_key_prompt_tokens_total", key)] == 6
    assert found[("appliance_key_generation_tokens_total", key)] == 9
    assert {dict(labels)["key"] for _, labels in found} == {"", "alice"}


def test_totals_survive_a_new_ledger(make_ledger: Callable[..., UsageLedger]) -> None:
    first = make_ledger()

    async def run() -> None:
        first.start()
        first.on_request_done(info("chat", "ops", Usage(2, 3)), 200, 0.1)
        await first.stop()

    asyncio.run(run())
    rows = asyncio.run(make_ledger().totals(key="ops"))
    assert [(r.model, r.counts) for r in rows] == [("chat", Counts(1, 0, 2, 3))]


def test_daily_quota_refuses_after_the_crossing_request(
    make_ledger: Callable[..., UsageLedger],
) -> None:
    clock = Clock(NOON)
    ledger = make_ledger({"alice": {"tokens_per_day": 20}}, clock)
    ledger.check_quota("alice")
    ledger.on_request_done(info("chat", "alice", Usage(5, 10)), 200, 0.1)  # 15 of 20
    ledger.check_quota("alice")
    ledger.on_request_done(info("chat", "alice", Usage(5, 10)), 200, 0.1)  # 30: crossed
    with pytest.raises(QuotaExceededError) as caught:
        ledger.check_quota("alice")
    error = caught.value
    assert error.status_code == 429
    assert "20 tokens per day" in error.message
    assert "resets at 2026-11-27T00:00:00Z" in error.message
    assert error.retry_after == 12 * 3600
    ledger.check_quota("ops")  # no quota
    ledger.check_quota(None)  # no key
    clock.now = datetime(2026, 11, 27, 0, 0, 1, tzinfo=timezone.utc)
    ledger.check_quota("alice")  # a new day


def test_monthly_quota_counts_every_day_of_the_month_and_survives_a_restart(
    make_ledger: Callable[..., UsageLedger],
) -> None:
    clock = Clock(datetime(2026, 11, 2, tzinfo=timezone.utc))
    first = make_ledger({"alice": {"tokens_per_month": 10}}, clock)
    first.on_request_done(info("chat", "alice", Usage(3, 3)), 200, 0.1)
    clock.now = NOON
    first.on_request_done(info("chat", "alice", Usage(2, 2)), 200, 0.1)
    with pytest.raises(QuotaExceededError, match="resets at 2026-12-01T00:00:00Z"):
        first.check_quota("alice")
    asyncio.run(first.flush())
    again = make_ledger({"alice": {"tokens_per_month": 10}}, clock)
    with pytest.raises(QuotaExceededError):
        again.check_quota("alice")
    clock.now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    again.check_quota("alice")
