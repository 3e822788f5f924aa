"""The usage store: requests and tokens per day, key and model, in a SQLite file.

One row per (UTC day, key, model); a write adds to the row. A day is the finest grain anyone
asks for (``--since DATE``, daily and monthly quotas), so the table stays small: keys times
models times days. Each call opens its own connection, so the store may be used from the
threads the ledger flushes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass
from datetime import date
from pathlib import Path

from appliance.sqlite_file import SQLiteFile

# Bumped when the table layout changes; kept in SQLite's own ``user_version`` header field.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key, model)
)
"""

_ADD = """
INSERT INTO usage (day, key, model, requests, errors, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key, model) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""


@dataclass
class Counts:
    """What was used: requests (errors among them) and tokens."""

    requests: int = 0
    errors: int = 0  # answers of status 400 and up; they carry no tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Counts) -> None:
        """Add ``other`` into these counts."""
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    @property
    def tokens(self) -> int:
        """Prompt and generated tokens together (what quotas count)."""
        return self.prompt_tokens + self.completion_tokens


UsageKey = tuple[date, str, str]
"""(UTC day, key name, model) of one row."""


@dataclass(frozen=True)
class UsageRow:
    """Totals of one key on one model over the days asked for."""

    key: str
    model: str
    counts: Counts


class UsageStore:
    """Usage rows in a SQLite file that survives restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SQLiteFile(path, _SCHEMA, SCHEMA_VERSION, "usage database")

    def add(self, deltas: Mapping[UsageKey, Counts]) -> None:
        """Add ``deltas`` to the stored rows, all in one transaction."""
        if not deltas:
            return
        rows = [
            (day.isoformat(), key, model, *astuple(counts))
            for (day, key, model), counts in deltas.items()
        ]
        with self._file.connect() as db:
            db.executemany(_ADD, rows)

    def totals(self, *, since: date | None = None, key: str | None = None) -> list[UsageRow]:
        """Totals per key and model from ``since`` (a UTC day, inclusive) on, for ``key`` or all."""
        query = (
            "SELECT key, model, SUM(requests), SUM(errors), SUM(prompt_tokens), "
            "SUM(completion_tokens) FROM usage WHERE day >= ? AND (? IS NULL OR key = ?) "
            "GROUP BY key, model ORDER BY key, model"
        )
        first = since.isoformat() if since is not None else ""
        with self._file.connect() as db:
            found = db.execute(query, (first, key, key)).fetchall()
        return [UsageRow(k, m, Counts(r, e, p, c)) for k, m, r, e, p, c in found]

    def tokens_by_day(self, since: date) -> dict[tuple[str, date], int]:
        """Tokens per (key, day) from ``since`` on: what quotas start from after a restart."""
        query = (
            "SELECT key, day, SUM(prompt_tokens + completion_tokens) FROM usage "
            "WHERE day >= ? GROUP BY key, day"
        )
        with self._file.connect() as db:
            found = db.execute(query, (since.isoformat(),)).fetchall()
        return {(k, date.fromisoformat(d)): int(n) for k, d, n in found}
