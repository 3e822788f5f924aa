"""The admin API: what the CLI's `appliance models ...` commands talk to."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from appliance.api.auth import Role, require_role
from appliance.appliance import Appliance


def build_admin_router(app: Appliance) -> APIRouter:
    """The ``/admin`` routes, bound to ``app``."""
    # The role goes with the routes, wherever they are mounted (the middleware checks paths).
    api = APIRouter(
        prefix="/admin", tags=["Admin"], dependencies=[Depends(require_role(Role.ADMIN))]
    )

    @api.get("/models", summary="Every model and its state")
    async def list_models() -> JSONResponse:
        """Catalogue entries with state, devices, memory, load time, in-flight requests."""
        return JSONResponse(
            {
                "object": "list",
                "catalogue_source": app.catalogue.origin.value,
                "device_kind": app.supervisor.inventory.kind.value,
                "devices": [
                    {
                        "index": device.index,
                        "label": device.label,
                        "name": device.name,
                        "total_gib": device.total_gib,
                    }
                    for device in app.supervisor.inventory.devices
                ],
                "data": [app.supervisor.describe(spec.name) for spec in app.catalogue.specs()],
            }
        )

    @api.get("/models/{name:path}/status", summary="One model")
    async def model_status(name: str) -> JSONResponse:
        """One model's entry and state."""
        return JSONResponse(app.supervisor.describe(app.catalogue.get(name).name))

    @api.post("/models/{name:path}/load", summary="Load a model")
    async def load(name: str) -> JSONResponse:
        """Load the model (evicting evictable ones if needed); answers once it is ready."""
        app.catalogue.get(name)
        evicted = await app.load(name)
        body = app.supervisor.describe(app.catalogue.get(name).name)
        body["evicted"] = evicted
        return JSONResponse(body)

    @api.post("/models/{name:path}/unload", summary="Unload a model")
    async def unload(name: str) -> JSONResponse:
        """Drain the model (bounded), then stop its engine and free its memory."""
        app.catalogue.get(name)
        await app.supervisor.unload(name)
        return JSONResponse(app.supervisor.describe(app.catalogue.get(name).name))

    @api.post("/models/{name:path}/sleep", summary="Put a model to sleep (GPU only)")
    async def sleep(name: str, level: int = 1) -> JSONResponse:
        """vLLM sleep mode: frees GPU memory, keeps the engine; 501 where there is no GPU."""
        app.catalogue.get(name)
        await app.supervisor.sleep(name, level)
        return JSONResponse(app.supervisor.describe(app.catalogue.get(name).name))

    @api.post("/models/{name:path}/wake", summary="Wake a sleeping model (GPU only)")
    async def wake(name: str) -> JSONResponse:
        """Counterpart of sleep."""
        app.catalogue.get(name)
        await app.supervisor.wake(name)
        return JSONResponse(app.supervisor.describe(app.catalogue.get(name).name))

    @api.post("/reload", summary="Re-read models.yaml and apply the difference")
    async def reload() -> JSONResponse:
        """New models load, removed ones drain and unload, changed ones restart."""
        return JSONResponse(await app.reload())

    @api.get("/registry", summary="Registry status and catalogue source")
    async def registry() -> JSONResponse:
        """Whether the registry is up and which catalogue is in force."""
        return JSONResponse(app.registry_status())

    return api
