"""The OpenAI-compatible routes: parse just enough to route, then hand over to the engine.

The body is checked only for being a JSON object with a ``model`` string; everything else is
validated by the engine (vLLM's own request models for local engines, the backend for remote
ones), so the appliance's answers match ``vllm serve``'s. Each route is a declaration: the
request goes the one model-request path (``api.serving``).
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.auth import Role, caller_is_admin, model_allowed, require_role
from appliance.api.body_screen import BodyScreen
from appliance.api.model_access import ModelAccess
from appliance.api.model_cards import vllm_card_fields
from appliance.api.request_limits import RequestLimits
from appliance.api.serving import DOC_BODY, ModelServing, read_json_object
from appliance.catalogue.schema import RemoteModelSpec
from appliance.engines.base import Endpoint
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.router import Router


def build_openai_router(
    access: ModelAccess,
    metrics: Metrics,
    *,
    log_prompts: bool = False,
    limits: RequestLimits | None = None,
    screen: BodyScreen | None = None,
) -> APIRouter:
    """The OpenAI model routes (chat, completions, embeddings); ``access`` admits each request
    and lends it its engine; prompts reach the log only if ``log_prompts``; ``limits``: what
    one request may ask for (default: the settings' defaults); ``screen`` checks each body
    first (default: ``BodyScreen()``)."""
    api = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_role(Role.USER))])
    serving = ModelServing(access, metrics, log_prompts=log_prompts, limits=limits, screen=screen)

    async def serve(request: Request, endpoint: Endpoint) -> Response:
        return await serving.serve(request, endpoint.route, await read_json_object(request))

    @api.post("/chat/completions", openapi_extra=DOC_BODY, summary="Chat completion")
    async def chat_completions(request: Request) -> Response:
        """Chat completion, streamed (SSE) when ``stream`` is true."""
        return await serve(request, Endpoint.CHAT)

    @api.post("/completions", openapi_extra=DOC_BODY, summary="Text completion")
    async def completions(request: Request) -> Response:
        """Text completion, streamed (SSE) when ``stream`` is true."""
        return await serve(request, Endpoint.COMPLETIONS)

    @api.post("/embeddings", openapi_extra=DOC_BODY, summary="Embeddings")
    async def embeddings(request: Request) -> Response:
        """Embeddings of one input or a list of inputs."""
        return await serve(request, Endpoint.EMBEDDINGS)

    return api


def build_model_list_router(router: Router, *, list_aliases: bool = False) -> APIRouter:
    """``GET /v1/models``: the table's models; ``list_aliases``: each alias is listed as a
    model of its own, as ``vllm serve`` lists every ``--served-model-name``."""
    api = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_role(Role.USER))])

    @api.get("/models", summary="List models")
    async def list_models(request: Request) -> JSONResponse:
        """Every model in the catalogue (that the caller's key may use), with its state."""
        data = []
        for spec in router.catalogue.specs():
            entry: dict[str, Any] = {
                "id": spec.name,
                "object": "model",
                "created": 0,
                "owned_by": spec.owner,
                "version": spec.version,
                "task": spec.task.value,
            }
            with contextlib.suppress(ApplianceError):  # the table may lag a catalogue change
                entry["state"] = router.supervisor.state_of(spec.name).value
                engine = router.supervisor.get(spec.name).engine
                entry.update(vllm_card_fields(engine, admin=caller_is_admin(request.scope)))
            if isinstance(spec, RemoteModelSpec) and caller_is_admin(request.scope):
                # Where a backend lives is the operator's business, not a user key's.
                entry["backend_url"] = spec.backend_url
            if any(model_allowed(request.scope, name) for name in spec.names()):
                data.append(entry)
                if list_aliases:
                    data.extend({**entry, "id": a, "alias_of": spec.name} for a in spec.aliases)
            # Each adapter is a model of its own (vLLM lists it with its parent).
            adapters: dict[str, str] = {}
            with contextlib.suppress(ApplianceError):
                adapters = router.supervisor.adapters_of(spec.name)
            data.extend(
                {**entry, "id": adapter, "parent": spec.name}
                for adapter in adapters
                if model_allowed(request.scope, adapter)
            )
        return JSONResponse({"object": "list", "data": data})

    return api
