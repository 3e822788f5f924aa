"""How the CLI shows a model's files on disk (``GET /admin/files`` rows)."""

from __future__ import annotations

from typing import Any

from appliance.hub.pull import format_bytes


def describe_files(row: dict[str, Any] | None) -> str:
    """``yes, 5.8 MB``, ``partial, 1.2 GB`` (some files, not a loadable set), ``no``, or ``-``
    for an entry with nothing on this disk (a remote backend)."""
    if row is None:
        return "-"
    size = int(row.get("size_bytes") or 0)
    if row.get("present"):
        return f"yes, {format_bytes(size)}" if size else "yes"
    return f"partial, {format_bytes(size)}" if size else "no"
