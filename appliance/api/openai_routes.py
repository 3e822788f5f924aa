"""The OpenAI-compatible routes: parse just enough to route, then hand over to the engine.

The body is checked only for being a JSON object with a ``model`` string; everything else is
validated by the engine (vLLM's own request models for local engines, the backend for remote
ones), so the appliance's answers match ``vllm serve``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from appliance.api.auth import Role, caller_is_admin, model_allowed, require_role
from appliance.api.body_screen import BodyScreen
from appliance.api.model_access import ModelAccess
from appliance.api.model_cards import vllm_card_fields
from appliance.api.request_limits import RequestLimits, check_request, default_request_limits
from appliance.api.stream_usage import USAGE_MARK, ask_for_usage, hide_usage, usage_of_event
from appliance.catalogue.schema import RemoteModelSpec
from appliance.engines.base import Endpoint, JSONReply, Reply, StreamReply, Usage
from appliance.errors import ApplianceError, InvalidRequestError
from appliance.metrics import Metrics
from appliance.request_info import RequestInfo, request_info
from appliance.router import Router

CLIENT_CLOSED_REQUEST = 499
_DOC_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {"model": {"type": "string"}},
                    "additionalProperties": True,
                }
            }
        },
    }
}


MAX_JSON_DEPTH = 64
"""Deepest nesting of a request body; far beyond any real request, well short of the
recursion limits of the parsers and serialisers the body meets later."""
_TOO_DEEP = f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; ``InvalidRequestError`` (400) otherwise."""
    raw = await request.body()
    if not raw:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # nested past the parser's own limit
        raise InvalidRequestError(_TOO_DEEP) from None
    if _nested_deeper_than(body, MAX_JSON_DEPTH):
        raise InvalidRequestError(_TOO_DEEP)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has containers nested more than ``limit`` deep (no recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


async def _until_disconnect(coro: Any, request: Request) -> Reply | None:
    """Run ``coro``; if the client goes away first, cancel it (which aborts it in vLLM) and
    return None."""
    work = asyncio.ensure_future(coro)

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return None
    return work.result()


async def _watch_stream(
    chunks: AsyncIterator[bytes], info: RequestInfo, metrics: Metrics, *, hidden_usage: bool
) -> AsyncIterator[bytes]:
    """Pass chunks through; time them and note the usage on the way. With ``hidden_usage``
    the usage event the client did not ask for is read, then taken out (``stream_usage``)."""
    model = info.model or ""
    last: float | None = None

    def note(usage: Usage) -> None:
        info.usage = usage

    source = hide_usage(chunks, note) if hidden_usage else chunks
    try:
        async for chunk in source:
            now = time.perf_counter()
            if last is None:
                info.first_token_at = now
            else:
                metrics.observe_inter_token(model, now - last)
            last = now
            if not hidden_usage and USAGE_MARK in chunk:
                info.usage = usage_of_event(chunk) or info.usage
            yield chunk
    finally:
        if source is not chunks:
            await source.aclose()  # type: ignore[attr-defined]


class _ReleasingStream(StreamingResponse):
    """A streamed answer that, however it ends, closes its source and releases the model.

    Cleanup lives here rather than in the generator's ``finally``: a generator that never
    started runs no ``finally``, and once the client has gone anyio cancels every later await
    in the task, so the cleanup is shielded.
    """

    def __init__(
        self,
        watched: AsyncIterator[bytes],
        source: AsyncIterator[bytes],
        release: contextlib.AsyncExitStack,
        headers: dict[str, str],
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(watched, media_type=media_type, headers=headers)
        self._watched = watched
        self._source = source
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                for iterator in (self._watched, self._source):
                    with contextlib.suppress(Exception):
                        # Closing vLLM's generator is what aborts the request in the engine.
                        await iterator.aclose()  # type: ignore[attr-defined]
                await self._release.aclose()


PROMPT_LOG_CHARS = 500


def _prompt_of(body: dict[str, Any]) -> str:
    """The request's prompt, messages or input, shortened for the access log."""
    for key in ("messages", "prompt", "input"):
        if key in body:
            text = json.dumps(body[key], ensure_ascii=False)
            return text[:PROMPT_LOG_CHARS] + ("..." if len(text) > PROMPT_LOG_CHARS else "")
    return ""


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
    limits = limits or default_request_limits()
    screen = screen or BodyScreen()

    async def serve(request: Request, endpoint: Endpoint) -> Response:
        info = request_info(request.scope)
        info.endpoint = endpoint.value
        body = await read_json_object(request)
        admin = caller_is_admin(request.scope)
        screened = await screen.check(body, admin=admin)
        cost = check_request(request.url.path, body, limits)
        lease = await access.lease(request, body, endpoint, cost)
        body["model"] = lease.model
        if log_prompts:
            info.extra["prompt"] = _prompt_of(body)
        info.stream = bool(body.get("stream")) and endpoint is not Endpoint.EMBEDDINGS
        # Usage is needed for per-key accounting even when the client did not ask for it.
        hidden_usage = info.stream and ask_for_usage(body)
        release = contextlib.AsyncExitStack()
        release.push_async_callback(lease.release)
        try:
            reply = await _until_disconnect(lease.engine.handle(endpoint, body, request), request)
        except BaseException:
            await release.aclose()
            raise
        if screened.fetches_media:
            reply = screen.reply(reply, admin=admin)
        if reply is None:
            await release.aclose()
            # Nobody is listening; 499 (nginx's "client closed request") is for the log.
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(reply, JSONReply):
            await release.aclose()
            info.usage = reply.usage
            return Response(
                content=reply.body,
                status_code=reply.status_code,
                media_type="application/json",
                headers=reply.headers,
            )
        assert isinstance(reply, StreamReply)
        return _ReleasingStream(
            _watch_stream(reply.chunks, info, metrics, hidden_usage=hidden_usage),
            reply.chunks,
            release,
            headers={"Cache-Control": "no-cache", **reply.headers},
        )

    @api.post("/chat/completions", openapi_extra=_DOC_BODY, summary="Chat completion")
    async def chat_completions(request: Request) -> Response:
        """Chat completion, streamed (SSE) when ``stream`` is true."""
        return await serve(request, Endpoint.CHAT)

    @api.post("/completions", openapi_extra=_DOC_BODY, summary="Text completion")
    async def completions(request: Request) -> Response:
        """Text completion, streamed (SSE) when ``stream`` is true."""
        return await serve(request, Endpoint.COMPLETIONS)

    @api.post("/embeddings", openapi_extra=_DOC_BODY, summary="Embeddings")
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
