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
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.auth import (
    Role,
    caller_is_admin,
    model_allowed,
    require_role,
)
from appliance.api.body_screen import BodyScreen
from appliance.api.model_access import ModelAccess
from appliance.api.openai_routes import (
    _DOC_BODY,
    CLIENT_CLOSED_REQUEST,
    _prompt_of,
    _ReleasingStream,
    _until_disconnect,
    _watch_stream,
    read_json_object,
)
from appliance.api.request_limits import RequestLimits, check_request, default_request_limits
from appliance.api.stored_responses import RESPONSES_PATH, ResponseOwners, caller_of
from appliance.engines.asgi_call import content_type
from appliance.engines.base import Engine, JSONReply, Reply, RouteCall, StreamReply, Usage
from appliance.engines.route_table import (
    ENGINE_ROUTES,
    RESPONSE_ID_ROUTES,
    VERSION_PATH,
    ModelRoute,
    wrong_route_message,
)
from appliance.errors import (
    ApplianceError,
    ModelNotFoundError,
    WrongTaskError,
)
from appliance.metrics import Metrics
from appliance.request_info import RequestInfo, request_info
from appliance.router import Router
from appliance.supervisor.states import ModelState


def endpoint_label(path: str) -> str:
    """The metrics' ``endpoint`` label of a route: its path without ``/`` or ``/v1/`` in front
    (``/v1/responses`` is ``responses``, as ``/v1/completions`` is ``completions``)."""
    return path.removeprefix("/v1/").lstrip("/")


def _check_serves(engine: Engine, model: str, route: ModelRoute) -> None:
    routes = engine.routes()
    if routes is not None and route.key not in routes:
        raise WrongTaskError(wrong_route_message(model, route.path, routes), param="model")


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


def _answer(
    reply: Reply | None,
    release: contextlib.AsyncExitStack,
    info: RequestInfo,
    metrics: Metrics,
) -> Response | _ReleasingStream:
    """The HTTP answer for an engine's reply; ``release`` is closed when it has gone out."""
    if reply is None:
        # Nobody is listening; 499 (nginx's "client closed request") is for the log.
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(reply, JSONReply):
        info.usage = reply.usage
        headers = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
        return Response(
            content=reply.body,
            status_code=reply.status_code,
            media_type=content_type(reply.headers),
            headers=headers,
        )
    assert isinstance(reply, StreamReply)
    headers = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
    return _ReleasingStream(
        _note_usage(_watch_stream(reply.chunks, info, metrics, hidden_usage=False), info),
        reply.chunks,
        release,
        headers={"Cache-Control": "no-cache", **headers},
    )


async def _note_usage(chunks: AsyncIterator[bytes], info: RequestInfo) -> AsyncIterator[bytes]:
    """Pass events on; note the token counts of the Responses and Messages APIs' events
    (``input_tokens``/``output_tokens``, inside ``response`` or ``message`` for some), which
    per-key accounting needs as much as the OpenAI routes' ``usage``."""
    async for chunk in chunks:
        if b'"input_tokens"' in chunk:
            info.usage = _usage_in_events(chunk) or info.usage
        yield chunk


def _usage_in_events(chunk: bytes) -> Usage | None:
    found = None
    for line in chunk.splitlines():
        if not line.startswith(b"data: {"):
            continue
        try:
            event = json.loads(line[6:])
        except (ValueError, RecursionError):  # a remote backend's events are untrusted
            continue
        for holder in (event, event.get("response"), event.get("message")):
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict) and "input_tokens" in usage:
                found = Usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
    return found


def build_vllm_router(
    access: ModelAccess,
    metrics: Metrics,
    *,
    log_prompts: bool = False,
    limits: RequestLimits | None = None,
    stored: ResponseOwners | None = None,
    screen: BodyScreen | None = None,
) -> APIRouter:
    """The routes of ``route_table.ENGINE_ROUTES``: ``access`` admits each request and lends
    it its model's engine; ``limits``: what one request may ask for (default: the settings'
    defaults); ``stored``: the owners of stored responses (None: the store is off, or this
    process passes requests that use it to the owner); ``screen`` checks each body first
    (default: ``BodyScreen()``)."""
    api = APIRouter(tags=["vLLM"])
    user = [Depends(require_role(Role.USER))]
    limits = limits or default_request_limits()
    screen = screen or BodyScreen()

    async def serve(request: Request, route: ModelRoute) -> Response:
        info = request_info(request.scope)
        info.endpoint = endpoint_label(route.path)
        body = await read_json_object(request)
        raw = await request.body()
        admin = caller_is_admin(request.scope)
        screened = await screen.check(body, admin=admin)
        cost = check_request(route.path, body, limits)
        caller = caller_of(request.scope)
        stored_id = None
        if stored is not None and route.path == RESPONSES_PATH:
            stored_id = _own_response(body, caller, stored)
        lease = await access.lease(request, body, None, cost)
        model = lease.model
        # An alias (the engine knows the model by its name), a stored id of ours, or fields
        # the screen took out.
        if model != body["model"] or stored_id is not None or screened.changed:
            body["model"] = model
            raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        if stored is not None and stored_id is not None:
            stored.add(stored_id, caller, lease.entry)
        if log_prompts:
            info.extra["prompt"] = _prompt_of(body)
        info.stream = body.get("stream") is True
        release = contextlib.AsyncExitStack()
        release.push_async_callback(lease.release)
        try:
            _check_serves(lease.engine, model, route)
            call = _route_call(request, route, raw, info.stream)
            reply = await _until_disconnect(lease.engine.handle_route(call, request), request)
        except BaseException:
            await release.aclose()
            if stored is not None and stored_id is not None:
                stored.discard(stored_id)
            raise
        if stored is not None and stored_id is not None and not _stored_ok(reply):
            stored.discard(stored_id)
        if screened.fetches_media:
            reply = screen.reply(reply, admin=admin)
        answer = _answer(reply, release, info, metrics)
        if not isinstance(answer, _ReleasingStream):
            await release.aclose()
        return answer

    def add_model_route(route: ModelRoute) -> None:
        async def endpoint(request: Request) -> Response:
            return await serve(request, route)

        endpoint.__doc__ = f"{route.summary}: answered by the model's engine as vLLM does."
        api.add_api_route(
            route.path,
            endpoint,
            methods=[route.method],
            summary=route.summary,
            openapi_extra=_DOC_BODY,
            dependencies=user,
            response_class=Response,
        )

    for route in ENGINE_ROUTES:
        add_model_route(route)
    return api


def _own_response(body: dict[str, Any], caller: str, stored: ResponseOwners) -> str | None:
    """Check the caller owns the response ``body`` continues from; name the one it stores
    (replacing any ``request_id``, which vLLM would take as the stored id). Returns the id,
    or None if the request stores nothing."""
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        stored.check(previous, caller, "previous_response_id")
    if body.get("store", True) is False:
        return None
    body["request_id"] = stored.new_id()
    return str(body["request_id"])


def _stored_ok(reply: Reply | None) -> bool:
    """Whether vLLM kept a response for ``reply`` (an error stores nothing)."""
    return reply is not None and not (isinstance(reply, JSONReply) and reply.status_code >= 400)


def build_table_routes(
    router: Router,
    metrics: Metrics,
    *,
    version: str | None = None,
    stored: ResponseOwners | None = None,
) -> APIRouter:
    """The vLLM routes that name no model and so need the whole table: the stored-response
    routes (``RESPONSE_ID_ROUTES``) and ``/version`` (vLLM's version, ``version``: None reads it
    when asked). ``stored``: whose each stored response is (None: the store is off); a caller
    gets 404 for a response not its own, and only the engine holding it is asked."""
    api = APIRouter(tags=["vLLM"])
    user = [Depends(require_role(Role.USER))]

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
        last: Reply | None = None
        for handle in router.supervisor.handles():
            if handle.state is not ModelState.READY or not model_allowed(
                request.scope, handle.name
            ):
                continue
            if holder is not None and handle.name != holder:
                continue
            release = contextlib.AsyncExitStack()
            try:
                try:
                    engine = await release.enter_async_context(router.any_engine_for(handle.name))
                except ApplianceError:
                    continue  # it stopped being ready (or is full) since it was listed
                routes = engine.routes()
                if routes is None or route.key not in routes:
                    await release.aclose()
                    continue
                reply = await _until_disconnect(engine.handle_route(call, request), request)
            except BaseException:
                await release.aclose()
                raise
            if isinstance(reply, JSONReply) and reply.status_code == 404:
                await release.aclose()
                last = reply
                continue
            info.model = handle.name
            answer = _answer(reply, release, info, metrics)
            if not isinstance(answer, _ReleasingStream):
                await release.aclose()
            return answer
        if last is not None:
            return _answer(last, contextlib.AsyncExitStack(), info, metrics)
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
