"""The registry's storage: one catalogue entry (``ModelSpec``) per name, in a SQLite file.

Each call opens its own connection, so one store may be shared by the threads FastAPI runs sync
handlers on; SQLite's own file locking (WAL mode, busy timeout) orders the writers. Entries are
kept as the full ``ModelSpec`` JSON beside name and timestamp columns, so a schema change in
``ModelSpec`` needs no migration of the table.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from appliance.catalogue.schema import (
    LOCAL_ONLY_FIELDS,
    REMOTE_ONLY_FIELDS,
    ModelSpec,
    parse_model_spec,
)
from appliance.errors import ApplianceError, ModelNotFoundError

# Bumped when the table layout changes; kept in SQLite's own ``user_version`` header field.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)
"""


class ModelExistsError(ApplianceError):
    """A model of that name is already in the registry (create refuses to overwrite it)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "model_exists"


class RegistryEntry(BaseModel):
    """One stored entry: the catalogue entry itself and when it was created and last replaced."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["registry.model"] = "registry.model"
    name: str
    created_at: datetime
    updated_at: datetime
    spec: ModelSpec


class RegistryStore:
    """Catalogue entries kept in a SQLite database file that survives restarts.

    The constructor creates the file (and its folder) and the table if they are missing, and
    switches the database to WAL mode so readers never wait for a writer.
    """

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            # journal_mode is stored in the file itself: set once, every later connection has it.
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ApplianceError(
                    f"registry database {path} has schema version {version}; this version of "
                    f"the appliance knows only up to {SCHEMA_VERSION}"
                )
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def list(self) -> list[RegistryEntry]:
        """Every entry, ordered by name."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT name, spec, created_at, updated_at FROM models ORDER BY name"
            ).fetchall()
        return [_entry(row) for row in rows]

    def get(self, name: str) -> RegistryEntry:
        """The entry called ``name``; ``ModelNotFoundError`` if there is none."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT name, spec, created_at, updated_at FROM models WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise _not_found(name)
        return _entry(row)

    def create(self, spec: ModelSpec) -> RegistryEntry:
        """Add a new entry; ``ModelExistsError`` if one of that name is already stored."""
        now = _now()
        try:
            with self._connect() as conn:
                conn.execute(
                    "INSERT INTO models (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (spec.name, spec.model_dump_json(), now, now),
                )
        except sqlite3.IntegrityError as exc:
            raise ModelExistsError(
                f"model {spec.name!r} is already in the registry; use PUT to replace it",
                param="name",
            ) from exc
        return RegistryEntry(
            name=spec.name,
            created_at=datetime.fromisoformat(now),
            updated_at=datetime.fromisoformat(now),
            spec=spec,
        )

    def replace(self, spec: ModelSpec) -> tuple[RegistryEntry, bool]:
        """Store ``spec`` under its name, creating or replacing; also says whether it was new.

        A replaced entry keeps its ``created_at``.
        """
        now = _now()
        with self._connect() as conn:
            # IMMEDIATE takes the write lock before the read, so "was it new?" cannot race
            # with another writer between the SELECT and the write.
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT created_at FROM models WHERE name = ?", (spec.name,)
            ).fetchone()
            created_at = now if row is None else row[0]
            conn.execute(
                "INSERT INTO models (name, spec, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, "
                "updated_at = excluded.updated_at",
                (spec.name, spec.model_dump_json(), created_at, now),
            )
        entry = RegistryEntry(
            name=spec.name,
            created_at=datetime.fromisoformat(created_at),
            updated_at=datetime.fromisoformat(now),
            spec=spec,
        )
        return entry, row is None

    def delete(self, name: str) -> None:
        """Remove the entry called ``name``; ``ModelNotFoundError`` if there is none."""
        with self._connect() as conn:
            deleted = conn.execute("DELETE FROM models WHERE name = ?", (name,)).rowcount
        if deleted == 0:
            raise _not_found(name)

    def count(self) -> int:
        """How many entries are stored (also a cheap check that the database answers)."""
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM models").fetchone()[0])

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection: commits on success, rolls back on error, and is always closed."""
        # isolation_level=None: autocommit, so one-statement writes need no BEGIN and
        # replace() can open its own IMMEDIATE transaction.
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        try:
            # NORMAL is durable against application crashes in WAL mode, and much faster
            # than FULL; only a power cut can lose the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()


def _now() -> str:
    """The current UTC time as stored in the table (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat()


def _entry(row: tuple[str, str, str, str]) -> RegistryEntry:
    """An entry from a table row."""
    name, spec_json, created_at, updated_at = row
    return RegistryEntry(
        name=name,
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
        spec=parse_model_spec(_without_other_kind(json.loads(spec_json))),
    )


def _without_other_kind(stored: Any) -> Any:
    """A stored entry without the fields of the other kind.

    Rows written before entries were split into local and remote kinds hold every field of
    both (a remote entry with ``source: null``, ``autoload: true``, ``engine: {}``); those
    fields never meant anything for the other kind, so they are dropped, not refused.
    """
    if not isinstance(stored, dict):
        return stored
    other = LOCAL_ONLY_FIELDS if stored.get("backend_url") is not None else REMOTE_ONLY_FIELDS
    return {key: value for key, value in stored.items() if key not in other}


def _not_found(name: str) -> ModelNotFoundError:
    """The error for a name the registry does not hold."""
    return ModelNotFoundError(f"model {name!r} is not in the registry", param="name")
