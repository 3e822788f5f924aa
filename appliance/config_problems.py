"""Pydantic validation errors of a config file turned into one line each, naming the entry.

``models.yaml`` and the API-keys file share the shape (a list of named entries), and their
errors must read the same way: "model 'chat': unknown field 'autolaod'".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def locate(
    error: Mapping[str, Any],
    section: str,
    entries: Sequence[Any],
    noun: str,
    *,
    name_ok: Callable[[str], bool] = lambda _: True,
) -> tuple[str, list[Any]]:
    """Which entry ``error`` is about ("model 'chat'", "key #2", "top level"), and the field path
    inside it. An entry whose ``name`` fails ``name_ok`` is named by its position instead."""
    loc = list(error.get("loc", ()))
    if len(loc) >= 2 and loc[0] == section and isinstance(loc[1], int):
        index = loc[1]
        entry = entries[index] if index < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"{noun} {name!r}" if isinstance(name, str) and name_ok(name) else None
        return where or f"{noun} #{index + 1}", loc[2:]
    return "top level", loc


def describe(error: Mapping[str, Any], where: str, loc: Sequence[Any], *, show_input: bool) -> str:
    """One problem as text; the offending value is quoted only if ``show_input``."""
    field = ".".join(str(part) for part in loc if not str(part).startswith("function-after"))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{where}: unknown field {field!r}"
    if kind == "missing":
        return f"{where}: field {field!r} is required"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    value = error.get("input")
    got = ""
    if show_input and kind != "model_type" and not isinstance(value, (dict, list)) and field:
        got = f" (got {value!r})"
    return f"{where}: field {field!r}: {message}{got}" if field else f"{where}: {message}"
