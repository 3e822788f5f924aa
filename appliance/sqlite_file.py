"""A SQLite file of the appliance's own (the usage store, the Batch API's store): created with
its folder and tables when missing, its layout version kept in SQLite's own ``user_version``
header field, in WAL mode so readers never wait for a writer. Each call opens its own
connection, one transaction, so a store may be used from any thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from appliance.errors import ConfigError


class SQLiteFile:
    """The database at ``path`` with the tables of ``schema`` (SQL statements), layout
    ``version``; ``what`` names it in errors ("usage database")."""

    def __init__(self, path: Path, schema: str, version: int, what: str) -> None:
        """Open (create) it; ``ConfigError`` if it cannot be, or has a layout not known here."""
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self.connect() as db:
                found = db.execute("PRAGMA user_version").fetchone()[0]
                if found not in (0, version):
                    raise ConfigError(
                        f"{path}: {what} has layout {found}; this appliance knows layout {version}"
                    )
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(schema)
                db.execute(f"PRAGMA user_version={version}")
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"{path}: cannot open the {what}: {exc}") from None

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction: committed on success, rolled back on error."""
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()
