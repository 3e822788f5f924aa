"""`appliance usage`: requests and tokens per API key and model, from ``GET /admin/usage``."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlencode

import typer
from rich.console import Console
from rich.table import Table

from appliance.cli.models_cmd import KEY_OPTION, URL_OPTION, AdminClient
from appliance.cli.output import JSON_OPTION, print_json, print_table

out = Console()
_DAYS = re.compile(r"^(\d+)d$")


def since_day(text: str, today: date | None = None) -> date:
    """``--since`` as a UTC day: ``YYYY-MM-DD``, ``today``, or ``Nd`` (N days before today)."""
    now = today or datetime.now(timezone.utc).date()
    if text == "today":
        return now
    days = _DAYS.match(text)
    if days:
        return now - timedelta(days=int(days.group(1)))
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected a date (2026-11-01), 'today' or a number of days ('7d')"
        ) from None


def usage(
    since: str | None = typer.Option(
        None, help="From this UTC day on: 2026-11-01, 'today' or '7d'. Default: all."
    ),
    key: str | None = typer.Option(None, help="Only this key (by its name)."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Requests and tokens per API key and model (kept across restarts)."""
    query: dict[str, str] = {}
    if since is not None:
        query["since"] = since_day(since).isoformat()
    if key is not None:
        query["key"] = key
    path = "/admin/usage" + (f"?{urlencode(query)}" if query else "")
    body = AdminClient(url, api_key).call("GET", path)
    if as_json:
        print_json(body)
        return
    title = f"usage since {body['since']}" if body.get("since") else "usage"
    table = Table(title=title)
    columns = ("KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "GENERATED", "TOTAL")
    for column in columns:
        table.add_column(column, justify="left" if column in ("KEY", "MODEL") else "right")
    totals = [0, 0, 0, 0, 0]
    for row in body.get("data", []):
        figures = [
            row["requests"],
            row["errors"],
            row["prompt_tokens"],
            row["completion_tokens"],
            row["total_tokens"],
        ]
        totals = [a + b for a, b in zip(totals, figures, strict=True)]
        table.add_row(row["key"] or "(no key)", row["model"], *(str(n) for n in figures))
    if len(body.get("data", [])) > 1:
        table.add_section()
        table.add_row("all", "", *(str(n) for n in totals))
    print_table(table, out)
