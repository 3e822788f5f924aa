"""``GET /metrics``: the Prometheus scrape endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import Response

from appliance.metrics import Metrics


def build_metrics_router(
    metrics: Metrics, *, settle: Callable[[], Awaitable[None]] | None = None
) -> APIRouter:
    """``/metrics`` serving ``metrics`` in the Prometheus text format, once ``settle`` has
    brought in the figures other processes hold (HTTP workers)."""
    api = APIRouter(tags=["Metrics"])

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def scrape() -> Response:
        """Every ``appliance_`` series, in the Prometheus text exposition format."""
        # On the event loop, not in a thread: the supervisor's handles and engines are
        # single-loop objects. The NVML reads cost a few milliseconds per scrape.
        if settle is not None:
            await settle()
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    return api
