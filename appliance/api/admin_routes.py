"""The admin API: what the CLI's `appliance models ...` commands talk to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from appliance.api.auth import Role, require_role
from appliance.api.serving import read_json_object
from appliance.appliance import Appliance
from appliance.errors import InvalidRequestError


def _text(body: dict[str, Any], key: str) -> str:
    """``body[key]`` as a non-empty string; 400 naming the field otherwise."""
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise InvalidRequestError(
            f"{key!r} is required: a string of 1 to 1024 characters", param=key
        )
    return value


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

    # Before the routes below: {name:path} would take "m/adapters" as a model's name.
    @api.get("/models/{name:path}/adapters", summary="A model's LoRA adapters")
    async def list_adapters(name: str) -> JSONResponse:
        """The LoRA adapters the model serves, each a model name of its own."""
        adapters = app.supervisor.adapters_of(app.supervisor.model_named(name))
        return JSONResponse(
            {"object": "list", "data": [{"name": a, "source": s} for a, s in adapters.items()]}
        )

    @api.post("/models/{name:path}/adapters/load", summary="Load a LoRA adapter")
    async def load_adapter(name: str, request: Request) -> JSONResponse:
        """Body ``{"name": ..., "source": ...}`` (folder or hub id): served at once on the
        running engine, with requests in flight on the model going on."""
        body = await read_json_object(request)
        adapter, source = _text(body, "name"), _text(body, "source")
        model = app.supervisor.model_named(name)
        await app.supervisor.load_adapter(model, adapter, source)
        return JSONResponse(app.supervisor.describe(model))

    @api.post("/models/{name:path}/adapters/unload", summary="Unload a LoRA adapter")
    async def unload_adapter(name: str, request: Request) -> JSONResponse:
        """Body ``{"name": ...}``: the adapter is no longer served."""
        body = await read_json_object(request)
        model = app.supervisor.model_named(name)
        await app.supervisor.unload_adapter(model, _text(body, "name"))
        return JSONResponse(app.supervisor.describe(model))

    @api.get("/models/{name:path}/status", summary="One model")
    async def model_status(name: str) -> JSONResponse:
        """One model's entry and state."""
        return JSONResponse(app.supervisor.describe(app.supervisor.model_named(name)))

    @api.post("/models/{name:path}/load", summary="Load a model")
    async def load(name: str) -> JSONResponse:
        """Load the model (evicting evictable ones if needed); answers once it is ready."""
        model = app.supervisor.model_named(name)
        evicted = await app.load(model)
        body = app.supervisor.describe(model)
        body["evicted"] = evicted
        return JSONResponse(body)

    @api.post("/models/{name:path}/unload", summary="Unload a model")
    async def unload(name: str) -> JSONResponse:
        """Drain the model (bounded), then stop its engine and free its memory."""
        model = app.supervisor.model_named(name)
        await app.supervisor.unload(model)
        return JSONResponse(app.supervisor.describe(model))

    @api.post("/models/{name:path}/sleep", summary="Put a model to sleep (GPU only)")
    async def sleep(name: str, level: int = 1) -> JSONResponse:
        """vLLM sleep mode: frees GPU memory, keeps the engine; 501 where there is no GPU."""
        model = app.supervisor.model_named(name)
        await app.supervisor.sleep(model, level)
        return JSONResponse(app.supervisor.describe(model))

    @api.post("/models/{name:path}/wake", summary="Wake a sleeping model (GPU only)")
    async def wake(name: str) -> JSONResponse:
        """Counterpart of sleep."""
        model = app.supervisor.model_named(name)
        await app.supervisor.wake(model)
        return JSONResponse(app.supervisor.describe(model))

    @api.post("/reload", summary="Re-read models.yaml and apply the difference")
    async def reload() -> JSONResponse:
        """New models load, removed ones drain and unload, changed ones restart."""
        return JSONResponse(await app.reload())

    @api.get("/registry", summary="Registry status and catalogue source")
    async def registry() -> JSONResponse:
        """Whether the registry is up and which catalogue is in force."""
        return JSONResponse(app.registry_status())

    return api
