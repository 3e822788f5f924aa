"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from appliance.supervisor.supervisor import Supervisor


def build_health_router(supervisor: Supervisor) -> APIRouter:
    """``/health`` (the process answers) and ``/ready`` (every autoload model is ready)."""
    api = APIRouter(tags=["Health"])

    @api.get("/health", summary="Liveness")
    async def health() -> JSONResponse:
        """200 while the process serves HTTP."""
        return JSONResponse({"status": "ok"})

    @api.get("/ready", summary="Readiness")
    async def ready() -> JSONResponse:
        """200 once every autoload model is ready; 503 (with each model's state) until then."""
        states = {h.name: h.state.value for h in supervisor.handles() if h.autoload}
        ok = supervisor.all_ready()
        return JSONResponse(
            {"ready": ok, "models": states},
            status_code=200 if ok else 503,
            headers=None if ok else {"Retry-After": "5"},
        )

    return api
