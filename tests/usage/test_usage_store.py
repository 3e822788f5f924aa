"""The usage store: rows add up, filters work, and everything is still there after a reopen."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.usage.store import Counts, UsageStore

DAY1 = date(2026, 11, 1)
DAY2 = date(2026, 11, 2)


def test_adds_up_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "usage.db"
    store = UsageStore(path)
    store.add({(DAY1, "alice", "chat"): Counts(2, 1, 10, 20)})
    store.add({(DAY1, "alice", "chat"): Counts(1, 0, 5, 6), (DAY2, "bob", "chat"): Counts(1)})
    again = UsageStore(path)
    rows = {(r.key, r.model): r.counts for r in again.totals()}
    assert rows == {("alice", "chat"): Counts(3, 1, 15, 26), ("bob", "chat"): Counts(1, 0, 0, 0)}


def test_totals_since_and_key(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.db")
    store.add(
        {
            (DAY1, "alice", "chat"): Counts(1, 0, 1, 1),
            (DAY2, "alice", "chat"): Counts(1, 0, 2, 2),
            (DAY2, "alice", "embed"): Counts(1, 0, 7, 0),
            (DAY2, "", "chat"): Counts(1, 0, 4, 4),
        }
    )
    since = store.totals(since=DAY2)
    assert [(r.key, r.model, r.counts.tokens) for r in since] == [
        ("", "chat", 8),
        ("alice", "chat", 4),
        ("alice", "embed", 7),
    ]
    only = store.totals(key="alice")
    assert [(r.model, r.counts.requests) for r in only] == [("chat", 2), ("embed", 1)]
    assert store.tokens_by_day(DAY1) == {
        ("alice", DAY1): 2,
        ("alice", DAY2): 11,
        ("", DAY2): 8,
    }


def test_refuses_a_newer_layout(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(ConfigError, match="layout 99"):
        UsageStore(path)
