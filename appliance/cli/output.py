"""What the CLI's listing commands print: a table in a terminal; for a pipe or a script,
plain columns that never cut or wrap a value (``appliance models list | grep NAME`` finds
every model), or the admin API's answer as JSON with ``--json``."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

JSON_OPTION = typer.Option(False, "--json", help="Print the admin API's answer as JSON.")
_GAP = "  "


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (no colours, no wrapping: for ``jq`` and scripts)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def plain_lines(table: Table) -> list[str]:
    """``table`` as plain columns: a header line, then one line a row, each column as wide
    as its widest value (nothing cut), no borders, no title."""
    columns = [
        [_plain(column.header), *(_plain(c) for c in column.cells)] for column in table.columns
    ]
    if not columns:
        return []
    widths = [max(len(cell) for cell in column) for column in columns]
    lines = []
    for row in zip(*columns, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(_GAP.join(cells).rstrip())
    return lines


def print_table(table: Table, console: Console) -> None:
    """``table`` drawn in a terminal; plain columns (``plain_lines``) anywhere else."""
    if console.is_terminal:
        console.print(table)
        return
    for line in plain_lines(table):
        sys.stdout.write(line + "\n")


def _plain(cell: Any) -> str:
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return " ".join(text.split()) or "-"  # one line a row, whatever a value holds
