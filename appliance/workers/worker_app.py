"""An HTTP worker's app: model requests served here, on this process's own engine clients;
everything else passed to the owner.

A model request (the OpenAI routes and every vLLM model route) is read, checked and admitted
as in the owner (the same routes, with a ``ModelAccess`` of its own), then sent straight to
the engine core by this process's vLLM client of it: the request's Python work (parsing,
templating, detokenizing, SSE) runs here, which is the point of having workers. A request for
a ready local model whose name this worker has seen is admitted here, on the lending board
every HTTP process shares (no round trip to the owner); any other asks the owner for a lease.
Its figures go to the owner, in batches, which counts them with its own.

Here: the app and what goes where; ``worker_access`` admits, ``attached_engines`` holds the
engine clients, ``figures_to_owner`` sends the counts.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.auth import (
    AuthMiddleware,
    key_limits_of,
)
from appliance.api.body_screen import BodyScreen
from appliance.api.cross_site import CrossSiteGuard
from appliance.api.error_handlers import register_error_handlers
from appliance.api.fair_access import fair_access_of, in_catalogue_file
from appliance.api.forwarded import NameTheWorker
from appliance.api.middleware import RequestContextMiddleware
from appliance.api.ollama_routes import OLLAMA_MODEL_PATHS, build_ollama_router, keep_alive_wire
from appliance.api.openai_routes import build_openai_router
from appliance.api.peer import local_host_names
from appliance.api.request_limits import request_limits_of
from appliance.api.stored_responses import store_enabled
from appliance.api.vllm_routes import build_vllm_router
from appliance.catalogue.config_file import load_catalogue_file
from appliance.engines.route_table import ENGINE_PATHS, is_model_route
from appliance.request_info import request_info
from appliance.settings import Settings
from appliance.supervisor.lending_board import LendingBoard
from appliance.workers.attached_engines import AttachedEngines
from appliance.workers.control import ControlClient, ControlError
from appliance.workers.figures_to_owner import ANSWERED_BY_OWNER, FiguresToOwner, Settling
from appliance.workers.proxy import OwnerProxy
from appliance.workers.worker_access import PassToOwner, WorkerAccess, owner_chooses_model

_OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


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

    access = fair_access_of(
        WorkerAccess(
            control,
            engines,
            board=board,
            key_limits=key_limits_of(settings.auth, board=board),
            quota_keys=frozenset(settings.quotas.quotas),
            figures=figures,
            stored_to_owner=store_enabled(),
        ),
        settings.fair_share,
        None,
        in_catalogue_file(load_catalogue_file(settings.config_path).models),
        share=settings.workers or 1,
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
            access,
            figures,
            log_prompts=settings.log_prompts,
            limits=limits,
            screen=screen,
            default_model=owner_chooses_model,
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
    app = Settling(app, figures)
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
