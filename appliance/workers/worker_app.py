"""An HTTP worker's app: model requests served here, on this process's own engine clients;
everything else passed to the owner.

A model request (the OpenAI routes and every vLLM model route) is read, checked and admitted
as in the owner (the same routes, with a ``ModelAccess`` of its own), then sent straight to
the engine core by this process's vLLM client of it: the request's Python work (parsing,
templating, detokenizing, SSE) runs here, which is the point of having workers. A request for
a ready local model whose name this worker has seen is admitted here, on the lending board
every HTTP process shares (no round trip to the owner); any other asks the owner for a lease.
Its figures go to the owner, in batches, which counts them with its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import pickle
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.auth import (
    KEY_SCOPE,
    AuthMiddleware,
    caller_is_admin,
    check_model_allowed,
    key_limits_of,
)
from appliance.api.body_screen import BodyScreen
from appliance.api.cross_site import CrossSiteGuard
from appliance.api.error_handlers import register_error_handlers
from appliance.api.forwarded import NameTheWorker
from appliance.api.middleware import RequestContextMiddleware
from appliance.api.model_access import Lease, model_of
from appliance.api.ollama_routes import OLLAMA_MODEL_PATHS, build_ollama_router, keep_alive_wire
from appliance.api.openai_routes import build_openai_router
from appliance.api.peer import local_host_names
from appliance.api.request_limits import RequestCost, request_limits_of
from appliance.api.stored_responses import keeps_stored_response, store_enabled
from appliance.api.vllm_routes import build_vllm_router
from appliance.engines.base import Endpoint, Engine, EngineLink, EngineStepFigures
from appliance.engines.remote import DETAIL_SCOPE
from appliance.engines.route_table import ENGINE_PATHS, is_model_route
from appliance.errors import ApplianceError, ModelNotAllowedError, OwnerUnavailableError
from appliance.request_info import RequestInfo, request_info
from appliance.settings import Settings
from appliance.supervisor.lending_board import KeyLimits, LendingBoard
from appliance.workers.control import ControlClient, ControlError
from appliance.workers.proxy import BODY_SCOPE, OwnerProxy

log = logging.getLogger("appliance")

_OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
ANSWERED_BY_OWNER = "answered_by_owner"


class EngineAttacher(Protocol):
    """Makes this process a client of an engine another process started."""

    def attach(self, link: EngineLink, client_index: int) -> Engine:
        """A new, not yet started, client ``client_index`` of the engine ``link`` names."""
        ...


class RelayedError(ApplianceError):
    """An error the owner raised, answered here as the owner would have."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message, param=detail.get("param"), retry_after=detail.get("retry_after"))
        self.status_code = int(detail.get("status", 500))
        self.error_type = str(detail.get("type", "internal_error"))
        self.code = str(detail.get("code", "internal_error"))


def relayed_error(exc: ControlError) -> ApplianceError:
    """The client's error for a call the owner did not answer: an ``ApplianceError`` the owner
    raised (it carries a status) as the owner would answer it; anything else (the channel
    gone, a failure inside the owner) a 503 that names no internals, logged here."""
    if "status" in exc.detail:
        return RelayedError(str(exc), exc.detail)
    log.warning("the owner did not answer a lease: %s", exc, extra={"event": "owner_call"})
    return OwnerUnavailableError(
        "the appliance could not admit this request just now; retry", retry_after=1.0
    )


class PassToOwner(Exception):
    """The model is not served by an engine this worker can reach: the owner answers."""


class LinkMissing(Exception):
    """The owner did not send a link this worker no longer has (closed meanwhile)."""


@dataclass(frozen=True)
class KnownName:
    """What a worker learnt of a requested name from the owner's lease, to admit the next
    request for it by itself (valid while the board's table generation stays the same)."""

    model: str  # the name its engine serves it under
    entry: str
    names: tuple[str, ...]  # the names a key may list to be allowed it
    link_id: str | None  # None: a remote entry, which the owner answers
    slot: int | None
    generation: int
    limit: int


class AttachedEngines:
    """This worker's clients of the owner's engines, made on first use, one per engine."""

    def __init__(self, attacher: EngineAttacher, index: int) -> None:
        self._attacher = attacher
        self._index = index
        self._engines: dict[str, Engine] = {}
        self._entry_of: dict[str, str] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ahead: set[asyncio.Task[Engine]] = set()

    def held(self) -> list[str]:
        """The link ids this worker has a client of (the owner need not send them again)."""
        return list(self._engines)

    def attached(self, link_id: str) -> Engine | None:
        """The client of ``link_id`` if this worker has one."""
        return self._engines.get(link_id)

    async def get(
        self, entry: str, link_id: str, link: str | None, adapters: dict[str, str]
    ) -> Engine:
        """The client for ``link_id``, attached now if new (``link`` is None when the owner
        knew we had it); older clients of ``entry`` are closed (the owner restarted or
        reloaded it, after draining their requests)."""
        engine = self._engines.get(link_id)
        if engine is None:
            async with self._locks[link_id]:
                engine = self._engines.get(link_id)
                if engine is None:
                    if link is None:
                        raise LinkMissing(link_id)
                    engine = await self._attach(entry, link_id, link)
        await _sync_adapters(engine, adapters)
        return engine

    async def _attach(self, entry: str, link_id: str, link: str) -> Engine:
        for old_id in [k for k, e in self._entry_of.items() if e == entry and k != link_id]:
            old = self._engines.pop(old_id, None)
            self._entry_of.pop(old_id, None)
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.stop()
        # The link comes from the owner, our parent, over a socket only this user can open.
        described: EngineLink = pickle.loads(base64.b64decode(link))
        started = time.perf_counter()
        engine = self._attacher.attach(described, self._index)
        await engine.start()
        log.info(
            "attached to engine",
            extra={"model": entry, "seconds": round(time.perf_counter() - started, 2)},
        )
        self._engines[link_id] = engine
        self._entry_of[link_id] = entry
        return engine

    def attach_ahead(self, links: list[dict[str, Any]]) -> None:
        """Attach to each engine of ``links`` (the owner's ``links()``) in the background, so
        a first request finds its client made; a request meanwhile waits for the same one."""
        for link in links:
            if str(link["link_id"]) in self._engines:
                continue
            task = asyncio.create_task(
                self.get(
                    str(link["entry"]),
                    str(link["link_id"]),
                    str(link["link"]),
                    dict(link["adapters"]),
                )
            )
            self._ahead.add(task)
            task.add_done_callback(self._attached_ahead)

    def _attached_ahead(self, task: asyncio.Task[Engine]) -> None:
        self._ahead.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A request for the model will try again, and answer with the reason.
            log.warning("attaching ahead failed: %s", task.exception())

    async def close(self) -> None:
        """Close every client (the engine cores stay: they are the owner's)."""
        for task in list(self._ahead):
            task.cancel()
        engines, self._engines = self._engines, {}
        for engine in engines.values():
            with contextlib.suppress(Exception):
                await engine.stop()


async def _sync_adapters(engine: Engine, adapters: dict[str, str]) -> None:
    """Each client's serving layer lists adapters of its own: load the owner's set here."""
    known = getattr(engine, "adapters", None)
    have = known() if callable(known) else {}
    for name, source in adapters.items():
        if name not in have:
            await engine.load_adapter(name, source)
    for name in set(have) - set(adapters):
        with contextlib.suppress(ApplianceError):
            await engine.unload_adapter(name)


class WorkerAccess:
    """``ModelAccess`` in an HTTP worker: a ready local model it knows is admitted here, on
    the lending board; anything else the owner admits and lends. The engine is ours."""

    def __init__(
        self,
        control: ControlClient,
        engines: AttachedEngines,
        *,
        board: LendingBoard,
        key_limits: Mapping[str, KeyLimits],
        quota_keys: frozenset[str],
        figures: FiguresToOwner,
        stored_to_owner: bool = False,
    ) -> None:
        """``key_limits``: each key's limits on ``board``; ``quota_keys``: keys with a token
        quota, always admitted by the owner (their usage is counted there);
        ``stored_to_owner``: pass the requests that store or read a stored response to the
        owner, which holds them all (``api.stored_responses``)."""
        self._stored_to_owner = stored_to_owner
        self._control = control
        self._engines = engines
        self._board = board
        self._key_limits = key_limits
        self._quota_keys = quota_keys
        self._figures = figures
        # By name and route: the owner's lease checked that the entry serves that route.
        self._known: dict[tuple[str, Endpoint | None], KnownName] = {}
        self._table_generation = board.table_generation

    async def lease(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None,
        cost: RequestCost | None = None,
    ) -> Lease:
        """Admit ``body``'s model here if the board allows it, else ask the owner (``cost``:
        what the request may cost, which the owner charges to the key)."""
        cost = cost or RequestCost()
        if self._stored_to_owner and keeps_stored_response(request.url.path, body):
            await self._pass_to_owner(request)
        info = request_info(request.scope)
        info.model = asked = model_of(body)
        if self._board.table_generation != self._table_generation:
            # Names, aliases or adapters changed: what we learnt may be wrong now.
            self._table_generation = self._board.table_generation
            self._known.clear()
        known = self._known.get((asked, endpoint))
        if known is not None:
            if known.link_id is None:
                await self._pass_to_owner(request)
            # A request of several sequences is charged more of its key's rate: the owner's.
            lease = self._lend_here(request, asked, known) if cost.sequences == 1 else None
            if lease is not None:
                return lease
        return await self._lease_from_owner(request, asked, endpoint, cost)

    def _lend_here(self, request: Request, asked: str, known: KnownName) -> Lease | None:
        """The owner's admission of a request for a ready local model, done here: the key's
        model list, then the entry still lent under the same engine, its queue and the key's
        limits, all charged at once on the board. None: ask the owner (who words any
        refusal, waits for loads, and charges nothing twice: nothing was charged here)."""
        identity = request.scope.get(KEY_SCOPE)
        if identity is not None and identity.name in self._quota_keys:
            return None
        if known.slot is None or known.link_id is None:
            return None
        engine = self._engines.attached(known.link_id)
        if engine is None or not engine.is_alive():
            return None
        try:
            check_model_allowed(request.scope, asked, known.names)
        except ModelNotAllowedError:
            return None  # the owner refuses it, charging the key as it does
        limits = self._key_limits.get(identity.name) if identity is not None else None
        slot = known.slot
        if not self._board.lend(slot, known.generation, known.limit, limits):
            return None
        info = request_info(request.scope)
        info.model = known.model
        # Remote engines name their backend and quote its errors only to admins.
        request.scope[DETAIL_SCOPE] = caller_is_admin(request.scope)
        self._figures.observe_queue_wait(known.model, 0.0)

        async def release() -> None:
            self._board.give_back(slot, limits)

        return Lease(model=known.model, entry=known.entry, engine=engine, release=release)

    async def _pass_to_owner(self, request: Request) -> NoReturn:
        request.scope[BODY_SCOPE] = await request.body()
        raise PassToOwner

    async def _lease_from_owner(
        self, request: Request, asked: str, endpoint: Endpoint | None, cost: RequestCost
    ) -> Lease:
        """Ask the owner for a lease on ``asked``; attach to its engine if new."""
        info = request_info(request.scope)
        identity = request.scope.get(KEY_SCOPE)
        client = request.scope.get("client")
        held = self._engines.held()
        for _ in range(2):
            try:
                got = await self._control.call(
                    "lease",
                    model=asked,
                    key=identity.name if identity is not None else None,
                    peer=list(client) if client else None,
                    endpoint=endpoint.value if endpoint is not None else None,
                    request_id=info.request_id,
                    held=held,
                    sequences=cost.sequences,
                    max_tokens=cost.max_tokens,
                )
            except ControlError as exc:
                raise relayed_error(exc) from None
            if got.get("proxy"):
                if got.get("remote"):
                    self._known[asked, endpoint] = KnownName(asked, asked, (), None, None, 0, 0)
                await self._pass_to_owner(request)
            token = str(got["lease"])

            async def release(token: str = token) -> None:
                with contextlib.suppress(ControlError):
                    await self._control.call("release", lease=token)

            try:
                engine = await self._engines.get(
                    str(got["entry"]), str(got["link_id"]), got.get("link"), dict(got["adapters"])
                )
            except LinkMissing:
                await release()
                held = []  # closed since we said we had it: ask once more, for the link
                continue
            except BaseException:
                await release()
                raise
            break
        else:
            raise RelayedError("the engine link could not be had; retry", {"status": 503})
        info.model = str(got["model"])
        request.scope[DETAIL_SCOPE] = bool(got.get("detail"))
        slot = got.get("slot")
        self._known[asked, endpoint] = KnownName(
            model=info.model,
            entry=str(got["entry"]),
            names=tuple(got.get("names", ())),
            link_id=str(got["link_id"]),
            slot=int(slot) if slot is not None else None,
            generation=int(got.get("generation", 0)),
            limit=int(got.get("limit", 0)),
        )
        return Lease(model=info.model, entry=str(got["entry"]), engine=engine, release=release)


class FiguresToOwner:
    """Request figures of this worker, sent to the owner to count (metrics, per-key usage).

    Finished requests and inter-token gaps are batched and sent by one task, at most
    ``period`` seconds after they happen, so counting costs no round trip per request.
    """

    def __init__(self, control: ControlClient, *, period: float = 0.2) -> None:
        self._control = control
        self._period = period
        self._requests: list[dict[str, Any]] = []
        self._gaps: defaultdict[str, list[float]] = defaultdict(list)
        self._waits: defaultdict[str, list[float]] = defaultdict(list)
        self._steps: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Requests whose answer is out but which are not counted yet (a few instructions).
        self._finishing = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def answer_sent(self) -> None:
        """A request's last byte went out; its figures follow (``counted``)."""
        self._finishing += 1
        self._settled.clear()

    def counted(self) -> None:
        """A request whose answer went out has been handed to ``on_request_done``."""
        self._finishing -= 1
        if self._finishing == 0:
            self._settled.set()

    async def flush(self) -> None:
        """Send every figure of the requests answered so far, now (the owner asks this
        before a scrape, so a client that saw its answer sees it counted)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout=2.0)
        await self._flush()

    def start(self) -> None:
        """Start sending."""
        self._task = asyncio.create_task(self._send_every())

    async def stop(self) -> None:
        """Send what is left, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._flush()

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Queue a finished request (one passed to the owner is the owner's to count)."""
        if info.extra.get(ANSWERED_BY_OWNER):
            return
        usage = info.usage
        self._requests.append(
            {
                "request_id": info.request_id,
                "model": info.model,
                "endpoint": info.endpoint,
                "usage": [usage.prompt_tokens, usage.completion_tokens] if usage else None,
                "stream": info.stream,
                "ttft": (info.first_token_at - info.started)
                if info.first_token_at is not None
                else None,
                "extra": {"key": info.extra["key"]} if "key" in info.extra else {},
                "status": status,
                "seconds": seconds,
            }
        )
        self._wake.set()

    def record_engine_step(self, model: str, figures: EngineStepFigures) -> None:
        """Queue one engine step's figures of this worker's client (``--engine-metrics``)."""
        self._steps[model].append(dataclasses.asdict(figures))

    def observe_inter_token(self, model: str, seconds: float) -> None:
        """Queue one gap between two tokens of a stream."""
        self._gaps[model].append(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Queue the wait of a request admitted here (the owner times those it lends)."""
        self._waits[model].append(seconds)

    async def _send_every(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._period)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        requests, self._requests = self._requests, []
        gaps, self._gaps = dict(self._gaps), defaultdict(list)
        steps, self._steps = dict(self._steps), defaultdict(list)
        waits, self._waits = dict(self._waits), defaultdict(list)
        if requests or gaps or steps or waits:
            with contextlib.suppress(ControlError):
                await self._control.call(
                    "observe", requests=requests, gaps=gaps, steps=steps, waits=waits
                )


class _Settling:
    """Tells ``figures`` when a request's answer is out and when it has been counted, so
    that a flush waits for the counts of every answer a client may have seen."""

    def __init__(self, app: ASGIApp, figures: FiguresToOwner) -> None:
        self._app = app
        self._figures = figures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        sent = False

        async def watched(message: Message) -> None:
            nonlocal sent
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not sent:
                sent = True
                self._figures.answer_sent()
            await send(message)

        try:
            await self._app(scope, receive, watched)
        finally:
            if sent:
                self._figures.counted()


class WorkerDispatch:
    """Model requests to this worker's own routes; everything else to the owner."""

    def __init__(self, local: ASGIApp, owner: ASGIApp) -> None:
        self._local = local
        self._owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._local(scope, receive, send)
            return
        if scope["type"] == "http" and _served_here(scope):
            await self._local(scope, receive, send)
        else:
            await self._owner(scope, receive, send)


def _served_here(scope: Scope) -> bool:
    if scope.get("method") != "POST":
        return False
    path = scope.get("path", "")
    # A stored response's own routes (/v1/responses/{id}/cancel) are the owner's: it holds
    # every stored response.
    return (
        path in _OPENAI_PATHS
        or path in OLLAMA_MODEL_PATHS
        or (is_model_route(path) and path in ENGINE_PATHS)
    )


def create_worker_app(
    settings: Settings,
    *,
    index: int,
    control: ControlClient,
    figures: FiguresToOwner,
    engines: AttachedEngines,
    owner: OwnerProxy,
    board: LendingBoard,
) -> ASGIApp:
    """Worker ``index``'s app: the model routes over ``engines`` (admitted on ``board`` or
    leased through ``control``, figures sent with ``figures``), the rest passed to the owner
    via ``owner``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        figures.start()
        try:
            yield
        finally:
            await figures.stop()
            await engines.close()
            await owner.aclose()
            await control.close()

    local = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    register_error_handlers(local)

    access = WorkerAccess(
        control,
        engines,
        board=board,
        key_limits=key_limits_of(settings.auth, board=board),
        quota_keys=frozenset(settings.quotas.quotas),
        figures=figures,
        stored_to_owner=store_enabled(),
    )
    limits = request_limits_of(settings)
    screen = BodyScreen(settings.media_url_networks)
    local.include_router(
        build_openai_router(  # type: ignore[arg-type]
            access, figures, log_prompts=settings.log_prompts, limits=limits, screen=screen
        )
    )
    local.include_router(
        build_vllm_router(  # type: ignore[arg-type]
            access, figures, log_prompts=settings.log_prompts, limits=limits, screen=screen
        )
    )

    async def keep_alive(entry: str, seconds: float, admin: bool) -> None:
        # The owner's supervisor keeps the model's idle clock: tell it.
        with contextlib.suppress(ControlError):
            await control.call(
                "keep_alive", entry=entry, seconds=keep_alive_wire(seconds), admin=admin
            )

    local.include_router(
        build_ollama_router(
            access,  # type: ignore[arg-type]
            figures,  # type: ignore[arg-type]
            keep_alive=keep_alive,
            log_prompts=settings.log_prompts,
        )
    )
    # Inside the key check: a request given up on is passed on without taking a key slot
    # here (the owner's own check takes it).
    local.add_middleware(_Replaying, owner=owner)
    local.add_middleware(AuthMiddleware, config=settings.auth, slots_elsewhere=True)
    app: ASGIApp = local
    if settings.cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app = CrossSiteGuard(
        app,
        allowed_hosts=settings.allowed_hosts or local_host_names(settings.host),
        cors_origins=settings.cors_origins,
    )
    app = RequestContextMiddleware(
        app,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        observer=figures,
    )
    app = _Settling(app, figures)
    return NameTheWorker(_Lifespan(WorkerDispatch(app, owner), local), index=index)


class _Replaying:
    """Runs the routes; a request they give up on (``PassToOwner``) goes to the owner with
    the body already read, before any of the answer was sent."""

    def __init__(self, app: ASGIApp, *, owner: ASGIApp) -> None:
        self._app = app
        self._owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._app(scope, receive, send)
        except PassToOwner:
            request_info(scope).extra[ANSWERED_BY_OWNER] = True
            await self._owner(scope, receive, send)


class _Lifespan:
    """Lifespan events to the FastAPI app (which owns start and stop), the rest to ``app``."""

    def __init__(self, app: ASGIApp, lifespan_app: ASGIApp) -> None:
        self._app = app
        self._lifespan_app = lifespan_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._lifespan_app if scope["type"] == "lifespan" else self._app
        await target(scope, receive, send)
