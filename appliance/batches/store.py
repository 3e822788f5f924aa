"""Files and batches of the Batch API, on disk: a SQLite file and a folder of file bodies.

Every object has an owner (the key's name; "" without a key) and is only found for its owner,
so another key's ids answer 404. Each line's result is recorded, in its own transaction, the
moment it is known, under the primary key (batch, line): a line is never recorded twice, and
after a restart the runner redoes only the lines with no result (``pending_lines``).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.sqlite_file import SQLiteFile

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    peer TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    times TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
);
"""


class BatchStatus(str, Enum):
    """A batch's state, as OpenAI names them."""

    VALIDATING = "validating"  # accepted, not started (the runner picks it up)
    IN_PROGRESS = "in_progress"  # lines running
    FINALIZING = "finalizing"  # every line has a result; the files are being written
    COMPLETED = "completed"
    EXPIRED = "expired"  # its completion window passed first
    CANCELLING = "cancelling"  # asked to cancel; lines in flight finish
    CANCELLED = "cancelled"
    FAILED = "failed"


FINISHED = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED, BatchStatus.FAILED}
)

_TIME_FIELDS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def new_id(prefix: str) -> str:
    """A fresh object id (``file-...``, ``batch_...``): 96 random bits, unguessable."""
    return prefix + secrets.token_hex(12)


@dataclass
class FileRecord:
    """One stored file."""

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_openai(self) -> dict[str, Any]:
        """The file as OpenAI's ``FileObject``."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class BatchRecord:
    """One batch, with its counts of lines answered."""

    id: str
    owner: str
    peer: dict[str, Any] | None  # the creator's client address and Host header
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    total: int
    metadata: dict[str, str] | None
    created_at: int
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0

    def to_openai(self) -> dict[str, Any]:
        """The batch as OpenAI's ``Batch``."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            **{name: self.times.get(name) for name in _TIME_FIELDS},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


class BatchStore:
    """Files and batches in ``db_path``, file bodies in ``files_dir``."""

    def __init__(self, db_path: Path, files_dir: Path) -> None:
        self.path = db_path
        self.files_dir = files_dir
        try:
            files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"{files_dir}: cannot make the batch files' folder: {exc}") from None
        self._file = SQLiteFile(db_path, _SCHEMA, SCHEMA_VERSION, "batch database")

    # -- files -----------------------------------------------------------------------------

    def _body_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileRecord:
        """Keep ``data`` as a new file of ``owner``; the body is on disk before the row."""
        record = FileRecord(new_id("file-"), owner, filename, purpose, len(data), int(time.time()))
        path = self._body_path(record.id)
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)
        with self._file.connect() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, owner, filename, purpose, record.bytes, record.created_at),
            )
        return record

    def file(self, owner: str, file_id: str) -> FileRecord | None:
        """``owner``'s file ``file_id``; None if there is none (or it is someone else's)."""
        with self._file.connect() as db:
            row = db.execute(
                "SELECT id, owner, filename, purpose, bytes, created_at FROM files "
                "WHERE id = ? AND owner = ?",
                (file_id, owner),
            ).fetchone()
        return FileRecord(*row) if row else None

    def files_of(self, owner: str) -> int:
        """How many files ``owner`` keeps."""
        with self._file.connect() as db:
            return int(
                db.execute("SELECT COUNT(*) FROM files WHERE owner = ?", (owner,)).fetchone()[0]
            )

    def content(self, record: FileRecord) -> bytes:
        """A file's body."""
        return self._body_path(record.id).read_bytes()

    # -- batches ---------------------------------------------------------------------------

    def add_batch(
        self,
        *,
        owner: str,
        peer: dict[str, Any] | None,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        window_seconds: float,
        total: int,
        metadata: dict[str, str] | None,
    ) -> BatchRecord:
        """A new batch of ``owner``, waiting for the runner."""
        now = int(time.time())
        record = BatchRecord(
            id=new_id("batch_"),
            owner=owner,
            peer=peer,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            status=BatchStatus.VALIDATING,
            total=total,
            metadata=metadata,
            created_at=now,
            times={"expires_at": now + int(window_seconds)},
        )
        with self._file.connect() as db:
            seq = db.execute("SELECT COALESCE(MAX(created_seq), 0) + 1 FROM batches").fetchone()[0]
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?)",
                (
                    record.id,
                    owner,
                    json.dumps(peer),
                    endpoint,
                    input_file_id,
                    completion_window,
                    record.status.value,
                    total,
                    json.dumps(metadata),
                    json.dumps({"created_at": now, **record.times}),
                    seq,
                ),
            )
        return record

    _BATCH_COLUMNS = (
        "id, owner, peer, endpoint, input_file_id, completion_window, status, total, metadata, "
        "times, output_file_id, error_file_id"
    )

    def _batch_of(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> BatchRecord:
        times = json.loads(row[9])
        record = BatchRecord(
            id=row[0],
            owner=row[1],
            peer=json.loads(row[2]),
            endpoint=row[3],
            input_file_id=row[4],
            completion_window=row[5],
            status=BatchStatus(row[6]),
            total=row[7],
            metadata=json.loads(row[8]),
            created_at=times.pop("created_at"),
            times=times,
            output_file_id=row[10],
            error_file_id=row[11],
        )
        counts = db.execute(
            "SELECT COALESCE(SUM(ok), 0), COUNT(*) - COALESCE(SUM(ok), 0) FROM results "
            "WHERE batch_id = ?",
            (record.id,),
        ).fetchone()
        record.completed, record.failed = int(counts[0]), int(counts[1])
        return record

    def batch(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        """``owner``'s batch ``batch_id`` (None as owner: anyone's, for the runner)."""
        with self._file.connect() as db:
            row = db.execute(
                f"SELECT {self._BATCH_COLUMNS} FROM batches WHERE id = ? "
                "AND (? IS NULL OR owner = ?)",
                (batch_id, owner, owner),
            ).fetchone()
            return self._batch_of(db, row) if row else None

    def batches_of(self, owner: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        """``owner``'s batches, newest first, from just past ``after`` (an id) on."""
        with self._file.connect() as db:
            start = None
            if after is not None:
                found = db.execute(
                    "SELECT created_seq FROM batches WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                start = found[0] if found else None
            rows = db.execute(
                f"SELECT {self._BATCH_COLUMNS} FROM batches WHERE owner = ? "
                "AND (? IS NULL OR created_seq < ?) ORDER BY created_seq DESC LIMIT ?",
                (owner, start, start, limit),
            ).fetchall()
            return [self._batch_of(db, row) for row in rows]

    def unfinished(self) -> list[str]:
        """The ids of every batch not finished (what the runner resumes after a restart)."""
        finished = tuple(status.value for status in FINISHED)
        with self._file.connect() as db:
            rows = db.execute(
                "SELECT id FROM batches WHERE status NOT IN (?, ?, ?, ?) ORDER BY created_seq",
                finished,
            ).fetchall()
        return [row[0] for row in rows]

    def set_status(
        self,
        batch_id: str,
        status: BatchStatus,
        *,
        unless: frozenset[BatchStatus] = frozenset(),
        output_file_id: str | None = None,
        error_file_id: str | None = None,
    ) -> bool:
        """Move ``batch_id`` to ``status`` (stamping its time) unless it is in one of
        ``unless``; False if it was."""
        now = int(time.time())
        with self._file.connect() as db:
            row = db.execute(
                "SELECT status, times FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if row is None or BatchStatus(row[0]) in unless:
                return False
            times = json.loads(row[1])
            times.setdefault(f"{status.value}_at", now)
            db.execute(
                "UPDATE batches SET status = ?, times = ?, "
                "output_file_id = COALESCE(?, output_file_id), "
                "error_file_id = COALESCE(?, error_file_id) WHERE id = ?",
                (status.value, json.dumps(times), output_file_id, error_file_id, batch_id),
            )
        return True

    # -- results ---------------------------------------------------------------------------

    def record(self, batch_id: str, line: int, *, ok: bool, result: dict[str, Any]) -> bool:
        """Keep line ``line``'s result; False (and nothing changed) if it has one already."""
        with self._file.connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), json.dumps(result, ensure_ascii=False)),
            )
            return cursor.rowcount == 1

    def answered_lines(self, batch_id: str) -> set[int]:
        """The lines of ``batch_id`` that have a result."""
        with self._file.connect() as db:
            rows = db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))
            return {row[0] for row in rows}

    def results(self, batch_id: str) -> list[tuple[bool, str]]:
        """Every recorded result of ``batch_id`` in line order: (ok, the result's JSON)."""
        with self._file.connect() as db:
            rows = db.execute(
                "SELECT ok, result FROM results WHERE batch_id = ? ORDER BY line", (batch_id,)
            ).fetchall()
        return [(bool(ok), text) for ok, text in rows]
