"""Ollama's API (``/api/*``) on the appliance's port, answered by the same models.

The model routes (chat, generate, embed, embeddings) turn an Ollama request into the OpenAI
body it means (``ollama_schema``), borrow the engine through the same ``ModelAccess.lease``
as ``/v1`` (keys, model lists, load gate, quotas, queue limits, usage and metrics come with
it), let the engine answer as it answers ``/v1``, and write the answer back Ollama's way
(``ollama_stream`` for NDJSON streams). They are served by HTTP workers too. The model-list
routes (tags, ps, show) read the owner's table; what cannot map (Modelfiles: create, push,
copy) answers Ollama's way, with a message saying why.

``keep_alive`` (a request's wish of how long its model stays loaded after it) is honoured for
admins, and for callers that may load models on demand (keys with ``may_load``) on models that
load on demand: nobody else may unload a model others use and could not load back; for others
it is ignored.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from appliance.api.auth import Role, caller_is_admin, may_load_on_demand, require_role
from appliance.api.model_access import Lease, ModelAccess
from appliance.api.ollama_schema import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Timing,
    chat_answer,
    chat_body,
    created_at,
    embed_body,
    error_message,
    generate_answer,
    generate_body,
    keep_alive_seconds,
    model_name,
    parse,
)
from appliance.api.ollama_stream import Kind, StreamTranslator
from appliance.api.replies import CLIENT_CLOSED_REQUEST, ReleasingStream, watch_stream
from appliance.api.request_limits import (
    RequestLimits,
    default_request_limits,
)
from appliance.api.serving import ModelServing, ServeHooks, read_json_object
from appliance.engines.base import Endpoint, JSONReply, Reply, StreamReply
from appliance.engines.usage import usage_of
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.request_info import RequestInfo
from appliance.supervisor.supervisor import Supervisor

NDJSON = "application/x-ndjson"


class KeepAliveSetter(Protocol):
    """Sets how long ``entry``'s running engine stays loaded once idle (``math.inf``: for
    good), as a request's ``keep_alive`` asks; ``admin``: the caller is an admin (else only a
    model that loads on demand takes it)."""

    def __call__(self, entry: str, seconds: float, admin: bool) -> Awaitable[None]:
        """Apply ``seconds`` to ``entry`` if the caller may."""
        ...


def ollama_error(message: str, status: int) -> JSONResponse:
    """Ollama's error answer: ``{"error": "..."}``."""
    return JSONResponse({"error": message}, status_code=status)


def may_set_keep_alive(request: Request) -> bool:
    """Whether this caller's ``keep_alive`` may be honoured at all (the model is checked
    where the table is: see the module's docstring)."""
    return caller_is_admin(request.scope) or may_load_on_demand(request.scope)


def keep_alive_allowed(admin: bool, load_on_demand: bool) -> bool:
    """Whether a ``keep_alive`` that passed ``may_set_keep_alive`` applies to a model."""
    return admin or load_on_demand


Build = Callable[[dict[str, Any]], tuple[Endpoint, Kind | None, dict[str, Any], bool]]


def build_ollama_router(
    access: ModelAccess,
    metrics: Metrics,
    *,
    keep_alive: KeepAliveSetter | None = None,
    log_prompts: bool = False,
    limits: RequestLimits | None = None,
) -> APIRouter:
    """Ollama's model routes; ``access`` admits each request and lends it its engine;
    ``keep_alive`` applies a request's ``keep_alive`` (None: accepted and ignored);
    ``limits``: what one request may ask for, checked on the OpenAI body it becomes (a
    ``format`` schema is a structured output like any other)."""
    limits = limits or default_request_limits()
    api = APIRouter(prefix="/api", tags=["Ollama"], dependencies=[Depends(require_role(Role.USER))])

    serving = ModelServing(access, metrics, log_prompts=log_prompts, limits=limits)

    async def serve(request: Request, label: str, build: Build) -> Response:
        """Translate, then the one model-request path (``api.serving``), whose reply is
        translated back. ``build`` gives the engine route, the answer's shape (None:
        embeddings), the OpenAI body and whether there is anything to run (an empty prompt
        only loads the model, as in Ollama)."""
        raw = await read_json_object(request)
        timing = Timing()
        endpoint, kind, body, has_work = build(raw)
        hooks = _OllamaHooks(label, kind, raw, has_work, keep_alive, metrics, timing)
        return await serving.serve(request, endpoint.route, body, label=f"api/{label}", hooks=hooks)

    def chat(raw: dict[str, Any]) -> tuple[Endpoint, Kind | None, dict[str, Any], bool]:
        req = parse(ChatRequest, raw)
        body = chat_body(req)
        return Endpoint.CHAT, "chat", body, bool(body["messages"])

    def generate(raw: dict[str, Any]) -> tuple[Endpoint, Kind | None, dict[str, Any], bool]:
        req = parse(GenerateRequest, raw)
        route, body = generate_body(req)
        endpoint = Endpoint.COMPLETIONS if route == "completions" else Endpoint.CHAT
        return endpoint, "generate", body, bool(req.prompt or req.images)

    def embed(raw: dict[str, Any]) -> tuple[Endpoint, Kind | None, dict[str, Any], bool]:
        req = parse(EmbedRequest, raw)
        return Endpoint.EMBEDDINGS, None, embed_body(req), bool(req.input)

    def embeddings(raw: dict[str, Any]) -> tuple[Endpoint, Kind | None, dict[str, Any], bool]:
        req = parse(EmbeddingsRequest, raw)
        body = {"model": model_name(req.model), "input": req.prompt}
        return Endpoint.EMBEDDINGS, None, body, bool(req.prompt)

    @api.post("/chat", summary="Ollama chat")
    async def api_chat(request: Request) -> Response:
        """Ollama's chat: NDJSON stream unless ``stream`` is false."""
        return await serve(request, "chat", chat)

    @api.post("/generate", summary="Ollama generate")
    async def api_generate(request: Request) -> Response:
        """Ollama's generate (``raw``: the prompt untouched; else the chat template)."""
        return await serve(request, "generate", generate)

    @api.post("/embed", summary="Ollama embed")
    async def api_embed(request: Request) -> Response:
        """Ollama's embeddings of one input or a list."""
        return await serve(request, "embed", embed)

    @api.post("/embeddings", summary="Ollama embeddings (older)")
    async def api_embeddings(request: Request) -> Response:
        """Ollama's older embeddings route: one prompt, one vector."""
        return await serve(request, "embeddings", embeddings)

    return api


class _OllamaHooks(ServeHooks):
    """Ollama's part of the one path: ``keep_alive``, a request with nothing to run, and the
    answer written back Ollama's way (NDJSON for streams)."""

    screened = False  # the body is ours, built from Ollama's (images come inline)
    hide_usage = False  # Ollama's bodies ask for usage themselves (``ollama_schema``)

    def __init__(
        self,
        label: str,
        kind: Kind | None,
        raw: dict[str, Any],
        has_work: bool,
        keep_alive: KeepAliveSetter | None,
        metrics: Metrics,
        timing: Timing,
    ) -> None:
        self._label = label
        self._kind = kind
        self._asked = str(raw.get("model"))
        self._seconds = keep_alive_seconds(raw.get("keep_alive"))
        self._has_work = has_work
        self._keep_alive = keep_alive
        self._metrics = metrics
        self._timing = timing

    async def leased(self, request: Request, lease: Lease) -> Response | None:
        seconds = self._seconds
        if seconds is not None and self._keep_alive is not None and may_set_keep_alive(request):
            await self._keep_alive(lease.entry, seconds, caller_is_admin(request.scope))
        return None if self._has_work else _loaded(self._asked, self._kind, seconds)

    async def respond(
        self,
        reply: Reply | None,
        release: contextlib.AsyncExitStack,
        info: RequestInfo,
        hidden_usage: bool,
    ) -> Response | None:
        if reply is None:
            await release.aclose()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(reply, JSONReply):
            await release.aclose()
            info.usage = reply.usage
            if reply.status_code >= 400:
                return ollama_error(error_message(reply.body), reply.status_code)
            try:
                answer = json.loads(reply.body)
            except ValueError:  # a remote backend's garbage
                return ollama_error("the model's backend answered something that is not JSON", 502)
            if not isinstance(answer, dict):
                return ollama_error("the model's backend answered something unexpected", 502)
            info.usage = info.usage or usage_of(answer.get("usage"))
            return JSONResponse(
                _answer(self._label, self._kind, self._asked, answer, self._timing, info)
            )
        assert isinstance(reply, StreamReply) and self._kind is not None
        translator = StreamTranslator(self._kind, self._asked, self._timing)
        chunks = reply.chunks
        metrics = self._metrics

        async def lines() -> AsyncIterator[bytes]:
            async for chunk in watch_stream(chunks, info, metrics, hidden_usage=False):
                for line in translator.feed(chunk):
                    yield line
            for line in translator.finish():
                yield line

        return ReleasingStream(
            lines(), chunks, release, headers={"Cache-Control": "no-cache"}, media_type=NDJSON
        )


OLLAMA_MODEL_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
"""The Ollama routes that run a model (an HTTP worker serves these itself)."""


def _loaded(model: str, kind: Kind | None, seconds: float | None) -> JSONResponse:
    """Ollama's answer to a request with nothing to run: the model is loaded (or will unload)."""
    if kind is None:
        return JSONResponse({"model": model, "embeddings": [], "embedding": []})
    reason = "unload" if seconds == 0 else "load"
    answer: dict[str, Any] = {"model": model, "created_at": created_at()}
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return JSONResponse({**answer, "done": True, "done_reason": reason})


def _answer(
    label: str,
    kind: Kind | None,
    model: str,
    reply: dict[str, Any],
    timing: Timing,
    info: Any,
) -> dict[str, Any]:
    if kind == "chat":
        return chat_answer(model, reply, timing, info.usage)
    if kind == "generate":
        return generate_answer(model, reply, timing, info.usage)
    vectors = [item.get("embedding") for item in reply.get("data") or []]
    if label == "embeddings":
        return {"embedding": vectors[0] if vectors else []}
    stats = timing.stats(info.usage)
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": stats["total_duration"],
        "load_duration": 0,
        "prompt_eval_count": stats.get("prompt_eval_count", 0),
    }


def keep_alive_wire(seconds: float) -> float:
    """``seconds`` as JSON can carry it between processes (-1: for good)."""
    return -1.0 if math.isinf(seconds) else seconds


def keep_alive_in(supervisor: Supervisor) -> KeepAliveSetter:
    """The ``KeepAliveSetter`` of the process that owns the model table."""

    async def set_keep_alive(entry: str, seconds: float, admin: bool) -> None:
        with contextlib.suppress(ApplianceError):  # unloaded or removed meanwhile
            handle = supervisor.get(entry)
            if handle.local is not None and keep_alive_allowed(admin, handle.local.load_on_demand):
                handle.ask_keep_alive(seconds)

    return set_keep_alive
