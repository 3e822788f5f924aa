"""Ollama's model-list routes (``/api/tags``, ``/ps``, ``/show``, ``/version``) and the ones
that manage models (``/pull``, ``/delete``: see ``ollama_manage``; ``/create``, ``/push``,
``/copy``: refused, with what to do instead).

They read the owner's model table (an HTTP worker passes them here). A model is listed under
its catalogue name (Ollama adds ``:latest`` to a bare name; a request for ``NAME:latest`` is a
request for ``NAME``); only the models the caller's key may use are listed or shown. What an
Ollama model file says that the appliance does not have (Modelfile, template, digest of a
blob) is filled in so that clients parse it, as the README lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from appliance.api.auth import Role, caller_is_admin, model_allowed, require_role
from appliance.api.model_cards import vllm_card_fields
from appliance.api.ollama_manage import build_ollama_manage_router
from appliance.api.ollama_routes import ollama_error
from appliance.api.ollama_schema import OLLAMA_API_VERSION, model_name
from appliance.api.serving import read_json_object
from appliance.appliance import Appliance
from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.errors import ApplianceError, ModelNotFoundError
from appliance.host.inventory import DeviceKind
from appliance.supervisor.states import ModelState

FOREVER = "9999-12-31T23:59:59Z"
"""``expires_at`` of a model that stays loaded (no ``keep_alive``, or ``keep_alive: -1``)."""
_GIB = 2**30
_NOT_MAPPED = {
    "create": "the appliance serves the models in models.yaml; add one there "
    "(or with `appliance models add`) instead of a Modelfile",
    "push": "the appliance does not push models to a registry",
    "copy": "the appliance has no model copies; give a model an alias in models.yaml instead",
}


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _digest(spec: ModelSpec) -> str:
    """A stable stand-in for Ollama's manifest digest: of the entry's name and version."""
    return hashlib.sha256(f"{spec.name}:{spec.version}".encode()).hexdigest()


def _details(spec: ModelSpec) -> dict[str, Any]:
    quantization = spec.engine.get("quantization") if isinstance(spec, LocalModelSpec) else None
    return {
        "parent_model": "",
        "format": "safetensors" if isinstance(spec, LocalModelSpec) else "remote",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": str(quantization or ""),
    }


def build_ollama_table_router(app: Appliance) -> APIRouter:
    """Ollama's model-list and model-management routes over ``app``'s table."""
    api = APIRouter(prefix="/api", tags=["Ollama"], dependencies=[Depends(require_role(Role.USER))])
    started = time.time()
    supervisor = app.supervisor

    def size_of(name: str) -> int:
        with contextlib.suppress(ApplianceError):
            return int(sum(supervisor.describe(name).get("reserved_gib") or []) * _GIB)
        return 0

    def listed(request: Request) -> list[tuple[str, ModelSpec]]:
        """(name, entry) of each model and adapter the caller's key may use."""
        found = []
        for spec in app.catalogue.specs():
            if any(model_allowed(request.scope, n) for n in spec.names()):
                found.append((spec.name, spec))
            adapters: dict[str, str] = {}
            with contextlib.suppress(ApplianceError):
                adapters = supervisor.adapters_of(spec.name)
            found.extend((a, spec) for a in adapters if model_allowed(request.scope, a))
        return found

    def entry(name: str, spec: ModelSpec) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": _stamp(started),
            "size": size_of(spec.name),
            "digest": _digest(spec),
            "details": _details(spec),
        }

    def expires_at(name: str) -> str:
        handle = supervisor.get(name)
        seconds = handle.keep_alive()
        if seconds is None or math.isinf(seconds):
            return FOREVER
        last_used = handle.last_used
        if handle.slot is not None:  # requests HTTP workers admitted by themselves
            last_used = max(last_used, supervisor.board.last_used(handle.slot))
        idle_since = time.time() - (time.monotonic() - last_used)
        return _stamp(idle_since + seconds)

    def known(request: Request, asked: str) -> tuple[str, ModelSpec]:
        name = model_name(asked)
        for listed_name, spec in listed(request):
            if name == listed_name or name in spec.aliases:
                return listed_name, spec
        raise ModelNotFoundError(f"model '{asked}' not found", param="model")

    @api.get("/version", summary="Ollama API version")
    async def version() -> JSONResponse:
        """The Ollama release whose API this follows."""
        return JSONResponse({"version": OLLAMA_API_VERSION})

    @api.get("/tags", summary="Ollama: the models")
    async def tags(request: Request) -> JSONResponse:
        """Every model the caller may use, loaded or not."""
        return JSONResponse({"models": [entry(n, s) for n, s in listed(request)]})

    @api.get("/ps", summary="Ollama: the loaded models")
    async def ps(request: Request) -> JSONResponse:
        """The models whose engines run now, and when they unload if idle."""
        running = []
        on_gpu = supervisor.inventory.kind is DeviceKind.GPU
        for name, spec in listed(request):
            with contextlib.suppress(ApplianceError):
                if supervisor.state_of(spec.name) is not ModelState.READY:
                    continue
                card = vllm_card_fields(supervisor.get(spec.name).engine, admin=False)
                size = size_of(spec.name)
                running.append(
                    {
                        **entry(name, spec),
                        "expires_at": expires_at(spec.name),
                        "size_vram": size if on_gpu else 0,
                        "context_length": card.get("max_model_len"),
                    }
                )
        return JSONResponse({"models": running})

    @api.post("/show", summary="Ollama: one model")
    async def show(request: Request) -> JSONResponse:
        """What Ollama shows of a model, from the catalogue entry and its engine."""
        body = await read_json_object(request)
        asked = body.get("model", body.get("name"))
        if not isinstance(asked, str) or not asked:
            return ollama_error("model is required", 400)
        name, spec = known(request, asked)
        engine = None
        with contextlib.suppress(ApplianceError):
            engine = supervisor.get(spec.name).engine
        card = vllm_card_fields(engine, admin=caller_is_admin(request.scope))
        routes = engine.routes() if engine is not None else None
        embeds = spec.task.value == "embed" or (
            routes is not None
            and "POST /v1/embeddings" in routes
            and "POST /v1/chat/completions" not in routes
        )
        capabilities = ["embedding"] if embeds else ["completion"]
        info: dict[str, Any] = {"general.basename": spec.name}
        if card.get("max_model_len"):
            info["general.context_length"] = card["max_model_len"]
        return JSONResponse(
            {
                "modelfile": f"# {name} is served by the appliance from models.yaml\n",
                "parameters": "",
                "template": "",
                "details": _details(spec),
                "model_info": info,
                "capabilities": capabilities,
                "modified_at": _stamp(started),
            }
        )

    # Admins: the hub pull and rm, streamed and answered Ollama's way.
    api.include_router(build_ollama_manage_router(app))
    for route, why in _NOT_MAPPED.items():
        api.add_api_route(f"/{route}", _refusal(why), methods=["POST"], summary=f"Ollama: {route}")
    return api


def _refusal(why: str) -> Any:
    """A route answering Ollama's way that it does not map here, and why."""

    async def refuse() -> JSONResponse:
        return ollama_error(why, 501)

    return refuse
