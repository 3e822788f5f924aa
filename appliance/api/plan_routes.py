"""``GET /admin/models/{name}/plan``: where a load would go now, without loading anything.

The answer comes from the same pure placement the supervisor uses for a real load (devices,
the memory reserved on each, the evictable models that would be put to sleep or unloaded for
it), plus
whether the model's files are on disk (a load without them downloads first).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from appliance.api.auth import Role, require_role
from appliance.appliance import Appliance
from appliance.errors import (
    EvictionTooSoonError,
    InsufficientResourcesError,
    InvalidRequestError,
)
from appliance.hub.disk import files_on_disk


def describe_plan(app: Appliance, name: str) -> dict[str, Any]:
    """The dry run of loading ``name`` as JSON-ready data."""
    spec = app.catalogue.get(name)
    if getattr(spec, "source", None) is None:
        raise InvalidRequestError(f"{name} is a remote backend: nothing is placed here")
    supervisor = app.supervisor
    handle = supervisor.get(name)
    devices = {d.index: d for d in supervisor.inventory.devices}
    body: dict[str, Any] = {
        "name": name,
        "state": handle.state.value,
        "device_kind": supervisor.inventory.kind.value,
        "placed_already": handle.allocation is not None,
    }
    try:
        plan = supervisor.plan_load(name)
    except (InsufficientResourcesError, EvictionTooSoonError) as exc:
        # The answer a load would get now (507, or 503 while the models in the way are too
        # recently loaded to evict), told as the plan's outcome.
        body.update(fits=False, reason=exc.message, devices=[], sleep=[], evict=[])
        return body
    allocation = plan.allocation
    body.update(
        fits=True,
        memory_share=round(allocation.memory_share, 4),
        devices=[
            {
                "index": index,
                "label": devices[index].label,
                "reserved_gib": round(gib, 3),
                "total_gib": devices[index].total_gib,
            }
            for index, gib in zip(allocation.devices, allocation.reserved_gib, strict=True)
        ],
        sleep=[
            {"name": sleeper, "level": 1, "memory_gib": _memory_gib(app, sleeper)}
            for sleeper in plan.sleep
        ],
        evict=[
            {
                "name": victim,
                "state": supervisor.get(victim).state.value,
                "memory_gib": _memory_gib(app, victim),
            }
            for victim in plan.evict
        ],
    )
    return body


def _memory_gib(app: Appliance, name: str) -> float | None:
    allocation = app.supervisor.get(name).allocation
    return allocation.memory_gib if allocation is not None else None


def build_plan_router(app: Appliance) -> APIRouter:
    """The admin route of `appliance models plan`."""
    api = APIRouter(
        prefix="/admin", tags=["Admin"], dependencies=[Depends(require_role(Role.ADMIN))]
    )

    @api.get("/models/{name:path}/plan", summary="Dry run of loading a model")
    async def plan(name: str) -> JSONResponse:
        """Devices, memory and evictions a load would use now; changes nothing."""
        body = describe_plan(app, name)
        base_dir = Path(app.settings.config_path).resolve().parent
        found = await asyncio.to_thread(files_on_disk, app.catalogue.get(name), base_dir)
        body["files"] = asdict(found)
        return JSONResponse(body)

    return api
