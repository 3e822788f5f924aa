"""``GET /admin/usage``: per-key usage totals, what ``appliance usage`` prints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from appliance.api.auth import Role, require_role
from appliance.errors import InvalidRequestError
from appliance.usage.ledger import UsageLedger


def parse_since(since: str | None) -> date | None:
    """``since`` as a UTC day (``YYYY-MM-DD``); ``InvalidRequestError`` (400) if it is not one."""
    if since is None or since == "":
        return None
    try:
        return date.fromisoformat(since)
    except ValueError:
        raise InvalidRequestError(
            f"'since' must be a date like 2026-11-01, not {since!r}", param="since"
        ) from None


def build_usage_router(
    ledger: UsageLedger, *, settle: Callable[[], Awaitable[None]] | None = None
) -> APIRouter:
    """The ``/admin/usage`` route, reading ``ledger`` once ``settle`` has brought in the
    figures other processes hold (HTTP workers)."""
    api = APIRouter(
        prefix="/admin", tags=["Admin"], dependencies=[Depends(require_role(Role.ADMIN))]
    )

    @api.get("/usage", summary="Requests and tokens per API key and model")
    async def usage(since: str | None = None, key: str | None = None) -> JSONResponse:
        """Totals per key and model from ``since`` (a UTC day, inclusive) on, for one key or all.

        Requests made without a key (the API open) are under the key ``""``; errors count as
        requests but carry no tokens.
        """
        first = parse_since(since)
        if settle is not None:
            await settle()
        rows = await ledger.totals(since=first, key=key)
        return JSONResponse(
            {
                "object": "list",
                "since": first.isoformat() if first else None,
                "data": [
                    {
                        "key": row.key,
                        "model": row.model,
                        "requests": row.counts.requests,
                        "errors": row.counts.errors,
                        "prompt_tokens": row.counts.prompt_tokens,
                        "completion_tokens": row.counts.completion_tokens,
                        "total_tokens": row.counts.tokens,
                    }
                    for row in rows
                ],
            }
        )

    return api
