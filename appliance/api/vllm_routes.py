"""The rest of ``vllm serve``'s routes: Responses, Messages, tokenize, pooling, score, rerank...

Each route in ``route_table.ENGINE_ROUTES`` is routed by the ``model`` of its JSON body to that
model's engine, which answers it as ``vllm serve`` does (a local engine with vLLM's own app for
that model; a remote one by passing the request through). The appliance adds what it adds to
every model request: keys and per-key model lists, load gate and quotas, queue limits, request
ids, the access log and the metrics' ``endpoint`` label. A model whose engine does not serve a
route gets a 400 naming the routes it does serve.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.auth import Role, model_allowed, require_role
from appliance.api.body_screen import BodyScreen
from appliance.api.default_model import DefaultModel
from appliance.api.model_access import Lease, ModelAccess
from appliance.api.replies import http_answer
from appliance.api.request_limits import RequestLimits
from appliance.api.serving import (
    DOC_BODY,
    ModelServing,
    ServeHooks,
    endpoint_label,
    read_json_object,
)
from appliance.api.stored_responses import RESPONSES_PATH, ResponseOwners, caller_of
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.engines.route_table import (
    ENGINE_ROUTES,
    MODEL_OPTIONAL_PATHS,
    RESPONSE_ID_ROUTES,
    VERSION_PATH,
    ModelRoute,
)
from appliance.errors import (
    ApplianceError,
    ModelNotFoundError,
    QuotaExceededError,
    WrongTaskError,
)
from appliance.metrics import Metrics
from appliance.request_info import request_info
from appliance.router import Router
from appliance.supervisor.states import ModelState


def _route_call(request: Request, route: ModelRoute, body: bytes, stream: bool) -> RouteCall:
    return RouteCall(
        route=route.key,
        method=request.method,
        path=request.url.path,
        query=request.scope.get("query_string", b""),
        body=body,
        request_id=request.headers.get("x-request-id"),
        stream=stream,
    )


def build_vllm_router(
    access: ModelAccess,
    metrics: Metrics,
    *,
    log_prompts: bool = False,
    limits: RequestLimits | None = None,
    stored: ResponseOwners | None = None,
    screen: BodyScreen | None = None,
    default_model: DefaultModel | None = None,
) -> APIRouter:
    """The routes of ``route_table.ENGINE_ROUTES``: ``access`` admits each request and lends
    it its model's engine; ``limits``: what one request may ask for (default: the settings'
    defaults); ``stored``: the owners of stored responses (None: the store is off, or this
    process passes requests that use it to the owner); ``screen`` checks each body first
    (default: ``BodyScreen()``); ``default_model``: the model of a request to one of
    ``MODEL_OPTIONAL_PATHS`` that names none (None: such a body is refused, 400)."""
    api = APIRouter(tags=["vLLM"])
    user = [Depends(require_role(Role.USER))]
    serving = ModelServing(access, metrics, log_prompts=log_prompts, limits=limits, screen=screen)

    async def serve(request: Request, route: ModelRoute) -> Response:
        body = await read_json_object(request)
        keeps = stored is not None and route.path == RESPONSES_PATH
        hooks = _StoredResponse(stored) if stored is not None and keeps else ServeHooks()
        label = endpoint_label(route.path)
        raw: bytes | None = await request.body()
        if default_model is not None and _names_no_model(route, body):
            body["model"] = await default_model(request, route.key)
            raw = None  # the engine gets the body with the model filled in
        return await serving.serve(request, route.key, body, raw=raw, label=label, hooks=hooks)

    def add_model_route(route: ModelRoute) -> None:
        async def endpoint(request: Request) -> Response:
            return await serve(request, route)

        endpoint.__doc__ = f"{route.summary}: answered by the model's engine as vLLM does."
        api.add_api_route(
            route.path,
            endpoint,
            methods=[route.method],
            summary=route.summary,
            openapi_extra=DOC_BODY,
            dependencies=user,
            response_class=Response,
        )

    for route in ENGINE_ROUTES:
        add_model_route(route)
    return api


def _names_no_model(route: ModelRoute, body: dict[str, Any]) -> bool:
    """Whether ``body`` leaves out a ``model`` that ``route`` lets a client leave out."""
    return route.path in MODEL_OPTIONAL_PATHS and body.get("model") is None


class _StoredResponse(ServeHooks):
    """A Responses API request that stores its response (or continues one): the caller must
    own the one it continues from, and becomes the owner of the one it stores."""

    def __init__(self, stored: ResponseOwners) -> None:
        self._stored = stored
        self._id: str | None = None
        self._caller = ""

    def before_lease(self, request: Request, body: dict[str, Any]) -> bool:
        """Check the caller owns the response ``body`` continues from; name the one it stores
        (replacing any ``request_id``, which vLLM would take as the stored id)."""
        previous = body.get("previous_response_id")
        caller = caller_of(request.scope)
        if isinstance(previous, str):
            self._stored.check(previous, caller, "previous_response_id")
        if body.get("store", True) is False:
            return False
        body["request_id"] = self._id = self._stored.new_id()
        self._caller = caller
        return True

    async def leased(self, request: Request, lease: Lease) -> Response | None:
        if self._id is not None:
            self._stored.add(self._id, self._caller, lease.entry)
        return None

    def replied(self, reply: Reply | None, lease: Lease) -> None:
        # An error stores nothing in vLLM.
        if self._id is not None and not _stored_ok(reply):
            self._stored.discard(self._id)

    def failed(self) -> None:
        if self._id is not None:
            self._stored.discard(self._id)


def _stored_ok(reply: Reply | None) -> bool:
    """Whether vLLM kept a response for ``reply`` (an error stores nothing)."""
    return reply is not None and not (isinstance(reply, JSONReply) and reply.status_code >= 400)


def build_table_routes(
    router: Router,
    access: ModelAccess,
    metrics: Metrics,
    *,
    version: str | None = None,
    stored: ResponseOwners | None = None,
) -> APIRouter:
    """The vLLM routes that name no model and so need the whole table: the stored-response
    routes (``RESPONSE_ID_ROUTES``; ``access`` admits each model asked, as for every model
    request) and ``/version`` (vLLM's version, ``version``: None reads it when asked).
    ``stored``: whose each stored response is (None: the store is off); a caller gets 404 for
    a response not its own, and only the engine holding it is asked."""
    api = APIRouter(tags=["vLLM"])
    user = [Depends(require_role(Role.USER))]
    serving = ModelServing(access, metrics)

    async def serve_stored_response(request: Request, route: ModelRoute) -> Response:
        """A route about a stored response names no model: ask each ready local model that
        serves the route (and that the key may use) until one knows the response."""
        info = request_info(request.scope)
        info.endpoint = endpoint_label("/v1/responses")
        info.stream = request.query_params.get("stream") == "true"
        call = _route_call(request, route, b"", info.stream)
        holder = None
        if stored is not None:
            response_id = str(request.path_params.get("response_id"))
            holder = stored.check(response_id, caller_of(request.scope))

        def serves_route(lease: Lease) -> None:
            routes = lease.engine.routes()
            if routes is None or route.key not in routes:
                raise WrongTaskError(f"model {lease.model!r} does not serve {route.path}")

        last: Reply | None = None
        for handle in router.supervisor.handles():
            if handle.state is not ModelState.READY or not model_allowed(
                request.scope, handle.name
            ):
                continue
            if holder is not None and handle.name != holder:
                continue
            try:
                held = await serving.lend_named(request, handle.name, check=serves_route)
            except QuotaExceededError:
                raise  # the key's own, whichever model it asks
            except ApplianceError:
                # It does not serve the route, or it stopped being ready (or is full) since
                # it was listed.
                continue
            reply = await held.ask(call, request)
            if isinstance(reply, JSONReply) and reply.status_code == 404:
                await held.release.aclose()
                last = reply
                continue
            info.model = handle.name
            return await serving.answer(request, held, reply)
        if last is not None:
            info.model = None  # no model knew it
            return await http_answer(last, contextlib.AsyncExitStack(), info, metrics)
        raise ModelNotFoundError(
            f"no ready model that this key may use holds response "
            f"{request.path_params.get('response_id')!r}"
        )

    def add_response_id_route(route: ModelRoute) -> None:
        async def endpoint(request: Request, response_id: str) -> Response:
            return await serve_stored_response(request, route)

        endpoint.__doc__ = f"{route.summary}, from whichever ready model holds it."
        api.add_api_route(
            route.path,
            endpoint,
            methods=[route.method],
            summary=route.summary,
            dependencies=user,
            response_class=Response,
        )

    for route in RESPONSE_ID_ROUTES:
        add_response_id_route(route)

    @api.get(VERSION_PATH, summary="vLLM version")
    async def vllm_version_route() -> JSONResponse:
        """The version of vLLM the engines run, as ``vllm serve``'s ``/version`` answers."""
        return JSONResponse({"version": version or _installed_vllm_version()})

    return api


def _installed_vllm_version() -> str:
    from appliance.engines.vllm import vllm_version

    return vllm_version()
