"""``GET /metrics``: the Prometheus scrape endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from appliance.api.auth import SCRAPER_SCOPE, caller_is_admin
from appliance.metrics import Metrics


def build_metrics_router(
    metrics: Metrics, *, settle: Callable[[], Awaitable[None]] | None = None
) -> APIRouter:
    """``/metrics`` serving ``metrics`` in the Prometheus text format, once ``settle`` has
    brought in the figures other processes hold (HTTP workers).

    The per-key series (``appliance_key_*``: every key's name and what it used) are for the
    operator: admins, loopback without keys, and the ``metrics_from`` scrapers see them; a
    user key (or a ``public: [metrics]`` caller) gets every other series, whose labels name
    models and routes, not other people's keys.
    """
    api = APIRouter(tags=["Metrics"])

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def scrape(request: Request) -> Response:
        """Every ``appliance_`` series, in the Prometheus text exposition format (the
        per-key ones to the operator only)."""
        # On the event loop, not in a thread: the supervisor's handles and engines are
        # single-loop objects. The NVML reads cost a few milliseconds per scrape.
        if settle is not None:
            await settle()
        operator = caller_is_admin(request.scope) or request.scope.get(SCRAPER_SCOPE) is True
        body, content_type = metrics.render(per_key=operator)
        return Response(content=body, media_type=content_type)

    return api
