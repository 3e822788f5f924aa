"""The one path of a model request, whatever route it came by.

A route module (``openai_routes``, ``vllm_routes``, ``ollama_routes``) only declares its routes:
each reads its body and calls ``ModelServing.serve``, which checks the body (the screen, the
request limits), resolves the model once into a ``Lease`` (``ModelAccess``: key's model list,
load gate, quota, queue limit, on-demand wait), hands the engine one ``RouteCall``, and sends
the reply back with its usage, metrics and stream handling (``replies``), the model held until
the answer has gone out. What a route does beyond that (stored responses, Ollama's shapes and
``keep_alive``) it says through ``ServeHooks``. A request that names its model outside a JSON
body (``/tokenizer_info?model=``, a stored response's holder) is lent it by the same lease
(``ModelServing.lend_named``), then asks and answers through the ``Held``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from appliance.api.auth import caller_is_admin
from appliance.api.body_screen import BodyScreen
from appliance.api.model_access import Lease, ModelAccess
from appliance.api.replies import http_answer, until_disconnect
from appliance.api.request_limits import (
    RequestCost,
    RequestLimits,
    check_request,
    default_request_limits,
)
from appliance.api.stream_usage import ask_for_usage
from appliance.engines.base import Endpoint, Engine, Reply, RouteCall, endpoint_of
from appliance.engines.route_table import wrong_route_message
from appliance.errors import InvalidRequestError, WrongTaskError
from appliance.metrics import Metrics
from appliance.request_info import RequestInfo, request_info

DOC_BODY = {
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
"""The OpenAPI body of every model route: a JSON object with a ``model``; the engine
validates the rest."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of a request body; far beyond any real request, well short of the
recursion limits of the parsers and serialisers the body meets later."""
_TOO_DEEP = f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"
PROMPT_LOG_CHARS = 500


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
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise InvalidRequestError(_TOO_DEEP)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def nested_deeper_than(value: Any, limit: int) -> bool:
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


def prompt_of(body: dict[str, Any]) -> str:
    """The request's prompt, messages or input, shortened for the access log."""
    for key in ("messages", "prompt", "input"):
        if key in body:
            text = json.dumps(body[key], ensure_ascii=False)
            return text[:PROMPT_LOG_CHARS] + ("..." if len(text) > PROMPT_LOG_CHARS else "")
    return ""


def endpoint_label(path: str) -> str:
    """The metrics' ``endpoint`` label of a route: its path without ``/`` or ``/v1/`` in front
    (``/v1/responses`` is ``responses``, as ``/v1/completions`` is ``completions``)."""
    return path.removeprefix("/v1/").lstrip("/")


class ServeHooks:
    """What a route adds to the one path; each hook does nothing by default."""

    screened = True  # the body passes the screen (``BodyScreen``) first
    hide_usage = True  # an OpenAI stream that did not ask for usage is asked, and it is hidden

    def before_lease(self, request: Request, body: dict[str, Any]) -> bool:
        """Adjust ``body`` before the model is leased; True if it changed it."""
        return False

    async def leased(self, request: Request, lease: Lease) -> Response | None:
        """The model is leased: an answer here ends the request (the engine is not asked)."""
        return None

    def replied(self, reply: Reply | None, lease: Lease) -> None:
        """The engine answered (None: the client left first)."""

    def failed(self) -> None:
        """The request failed before an answer (the lease is given back)."""

    async def respond(
        self,
        reply: Reply | None,
        release: contextlib.AsyncExitStack,
        info: RequestInfo,
        hidden_usage: bool,
    ) -> Response | None:
        """The HTTP answer, if the route shapes its own (None: as the engine shaped it)."""
        return None


_NO_HOOKS = ServeHooks()

GENERATES_NOTHING = RequestCost(max_tokens=0)
"""What a request that names its model outside a body may cost: it generates no tokens (a
tokenizer's configuration, a stored response read back)."""


@dataclass
class Held:
    """A model lent to one request (``lease``), held until ``release`` closes."""

    lease: Lease
    release: contextlib.AsyncExitStack

    async def ask(self, call: RouteCall, request: Request) -> Reply | None:
        """The engine's reply to ``call`` (None: the client left first); on any failure the
        model is given back."""
        try:
            return await until_disconnect(self.lease.engine.serve(call, request), request)
        except BaseException:
            await self.release.aclose()
            raise


def check_serves(engine: Engine, model: str, route: str) -> None:
    """Refuse (400) a route that ``engine`` does not serve, naming those it does."""
    routes = engine.routes()
    if routes is not None and route not in routes:
        path = route.split(" ", 1)[1]
        raise WrongTaskError(wrong_route_message(model, path, routes), param="model")


class ModelServing:
    """Serves model requests: ``access`` admits each and lends it its engine; prompts reach
    the log only if ``log_prompts``; ``limits``: what one request may ask for (default: the
    settings' defaults); ``screen`` checks each body first (default: ``BodyScreen()``)."""

    def __init__(
        self,
        access: ModelAccess,
        metrics: Metrics,
        *,
        log_prompts: bool = False,
        limits: RequestLimits | None = None,
        screen: BodyScreen | None = None,
    ) -> None:
        self._access = access
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._limits = limits or default_request_limits()
        self._screen = screen or BodyScreen()

    async def serve(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        *,
        raw: bytes | None = None,
        label: str | None = None,
        hooks: ServeHooks = _NO_HOOKS,
    ) -> Response:
        """Answer one request for ``route`` (``"POST /v1/chat/completions"``) whose JSON body
        is ``body``. ``raw``: the client's bytes, passed on as they came unless the body had
        to change (an alias, a stored id, fields the screen took out); None: the engine gets
        ``body`` parsed (the OpenAI routes and Ollama's). ``label``: the metrics' endpoint
        label (default: from the route's path)."""
        path = route.split(" ", 1)[1]
        endpoint = endpoint_of(route)
        info = request_info(request.scope)
        info.endpoint = label or endpoint_label(path)
        admin = caller_is_admin(request.scope)
        screened = await self._screen.check(body, admin=admin) if hooks.screened else None
        cost = check_request(path, body, self._limits)
        changed = hooks.before_lease(request, body)
        # The three OpenAI routes name their endpoint: the lease checks the model serves it.
        held = await self.lend(request, body, endpoint, cost)
        lease, release = held.lease, held.release
        # The lease may have set fields the engine must see (the key's ``priority``).
        changed = changed or lease.changed_body
        try:
            done = await hooks.leased(request, lease)
            if done is not None:
                await release.aclose()
                return done
            # An alias becomes the name the engine knows the model by.
            changed = changed or lease.model != body["model"]
            body["model"] = lease.model
            if self._log_prompts:
                info.extra["prompt"] = prompt_of(body)
            if endpoint is not None:
                info.stream = endpoint is not Endpoint.EMBEDDINGS and bool(body.get("stream"))
            else:
                info.stream = body.get("stream") is True
            # Usage is needed for per-key accounting even when the client did not ask for it
            # (the OpenAI routes; the others' streams carry it unasked).
            hidden_usage = (
                endpoint is not None and info.stream and hooks.hide_usage and ask_for_usage(body)
            )
            call = self._call(request, route, path, body, raw, info.stream, changed, screened)
            if endpoint is None:
                check_serves(lease.engine, lease.model, route)
            reply = await held.ask(call, request)
        except BaseException:
            await release.aclose()
            hooks.failed()
            raise
        hooks.replied(reply, lease)
        if screened is not None and screened.fetches_media:
            reply = self._screen.reply(reply, admin=admin)
        answer = await hooks.respond(reply, release, info, hidden_usage)
        if answer is not None:
            return answer
        return await http_answer(reply, release, info, self._metrics, hidden_usage=hidden_usage)

    async def lend(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None = None,
        cost: RequestCost | None = None,
    ) -> Held:
        """Lease ``body``'s model to the request (``ModelAccess.lease``: key's model list, load
        gate, quota, queue limit, on-demand wait), held until the ``Held``'s release closes."""
        lease = await self._access.lease(request, body, endpoint, cost)
        release = contextlib.AsyncExitStack()
        release.push_async_callback(lease.release)
        return Held(lease, release)

    async def lend_named(
        self, request: Request, model: str, *, check: Callable[[Lease], None] | None = None
    ) -> Held:
        """``lend`` for a request that names ``model`` outside a JSON body and generates
        nothing (``GET /tokenizer_info?model=``, a stored response read from its holder).
        ``check`` raises if the lent model may not answer it (its engine lacks the route):
        the model is given back first."""
        held = await self.lend(request, {"model": model}, None, GENERATES_NOTHING)
        if check is not None:
            try:
                check(held.lease)
            except BaseException:
                await held.release.aclose()
                raise
        return held

    async def answer(self, request: Request, held: Held, reply: Reply | None) -> Response:
        """Send ``reply`` (which ``held.ask`` got) back as the HTTP answer, its usage and
        metrics noted; the model is given back once it has gone out."""
        return await http_answer(reply, held.release, request_info(request.scope), self._metrics)

    @staticmethod
    def _call(
        request: Request,
        route: str,
        path: str,
        body: dict[str, Any],
        raw: bytes | None,
        stream: bool,
        changed: bool,
        screened: Any,
    ) -> RouteCall:
        request_id = request.headers.get("x-request-id")
        endpoint = endpoint_of(route)
        if raw is None and endpoint is not None:
            return RouteCall.of_endpoint(endpoint, body, request_id)
        if raw is None or changed or (screened is not None and screened.changed):
            raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return RouteCall(
            route=route,
            method=request.method,
            path=request.url.path if endpoint is None else path,
            query=request.scope.get("query_string", b""),
            body=raw,
            request_id=request_id,
            stream=stream,
        )
