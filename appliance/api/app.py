"""The app factory: the FastAPI app composed explicitly from an ``Appliance``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from appliance import __version__
from appliance.api.admin_routes import build_admin_router
from appliance.api.auth import AuthMiddleware, key_limits_of
from appliance.api.auth_file import describe_open
from appliance.api.batch_routes import batch_runner_of, build_batch_router
from appliance.api.body_screen import BodyScreen
from appliance.api.cross_site import CrossSiteGuard
from appliance.api.default_model import table_default_model
from appliance.api.docs_page import build_docs_router
from appliance.api.error_handlers import register_error_handlers
from appliance.api.fair_access import fair_access_of, in_table
from appliance.api.forwarded import NameTheWorker, TrustWorkers
from appliance.api.health_routes import build_health_router
from appliance.api.hub_routes import build_hub_router
from appliance.api.metrics_routes import build_metrics_router
from appliance.api.middleware import RequestContextMiddleware
from appliance.api.model_access import TableAccess
from appliance.api.observers import RequestObservers
from appliance.api.ollama_models import build_ollama_table_router
from appliance.api.ollama_routes import build_ollama_router, keep_alive_in
from appliance.api.openai_routes import build_model_list_router, build_openai_router
from appliance.api.peer import local_host_names
from appliance.api.plan_routes import build_plan_router
from appliance.api.request_limits import request_limits_of
from appliance.api.status_page import StatusPage
from appliance.api.stored_responses import ResponseOwners, forget_in_table, store_enabled
from appliance.api.tokenizer_info import build_tokenizer_info_router
from appliance.api.usage_routes import build_usage_router
from appliance.api.vllm_routes import build_table_routes, build_vllm_router
from appliance.appliance import Appliance
from appliance.errors import ApplianceError
from appliance.host.inventory import Inventory
from appliance.settings import Settings
from appliance.supervisor.handle import EngineMaker
from appliance.supervisor.supervisor import Supervisor

log = logging.getLogger("appliance")


StartupView = Callable[[Supervisor], Awaitable[None]]
"""Shows the models loading at start (``appliance up`` in a terminal); returns when done."""


def create_app(
    settings: Settings,
    appliance: Appliance | None = None,
    *,
    startup_view: StartupView | None = None,
    engines: EngineMaker | None = None,
    inventory: Inventory | None = None,
    worker_token: str | None = None,
    with_workers: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """Build the appliance (validating the catalogue) and its HTTP app.

    Engines start in the app's lifespan, not here, so building the app is cheap and fails
    fast on a bad configuration. ``engines`` and ``inventory`` replace vLLM's engine maker and
    the detected devices (fast tests of the HTTP layer run the routes on a test engine).
    With HTTP workers (``appliance up --workers``), ``with_workers`` runs them while the
    engines are up, and ``worker_token`` is what their passed-on requests carry.
    """
    core = appliance or Appliance(settings, engines=engines, inventory=inventory)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def reload_on_sighup() -> None:
            async def run() -> None:
                try:
                    await core.reload()
                except ApplianceError as exc:
                    log.error("reload refused: %s", exc.message, extra={"event": "reload"})

            reloads.add(loop.create_task(run()))

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
        warning = describe_open(settings.auth)
        if warning is not None:
            log.warning(warning, extra={"event": "auth_open"})
        await core.start()
        await batches.start()

        async def announce_ready() -> None:
            await core.supervisor.wait_autoload()
            # Everything allocated so far (modules, engines, serving layers) lives as long as
            # the process: move it out of the collector's sight so GC pauses stay short.
            gc.collect()
            gc.freeze()
            states = {h.name: h.state.value for h in core.supervisor.handles()}
            log.info("autoload finished", extra={"event": "autoload_done", "models": states})

        announcer = asyncio.create_task(announce_ready())
        viewer = asyncio.create_task(startup_view(core.supervisor)) if startup_view else None
        try:
            async with with_workers(app) if with_workers else contextlib.nullcontext():
                yield
        finally:
            announcer.cancel()
            if viewer is not None:
                viewer.cancel()
            log.info("shutting down", extra={"event": "shutdown"})
            await batches.stop()  # before the engines: a line cut short is redone later
            await core.stop()

    app = FastAPI(
        title="appliance",
        version=__version__,
        description="Several vLLM engines behind one OpenAI-compatible API.",
        lifespan=lifespan,
        # FastAPI's pages load Swagger UI / ReDoc from a CDN, on the status page's origin:
        # ours has no script (``docs_page``).
        docs_url=None,
        redoc_url=None,
    )
    app.state.appliance = core
    register_error_handlers(app)
    app.include_router(build_health_router(core.supervisor))
    # One set of key limits, shared with the HTTP workers' admissions.
    key_limits = key_limits_of(settings.auth, board=core.supervisor.board)
    table_access = TableAccess(
        core.router,
        core.metrics,
        check_quota=core.usage.check_quota,
        key_limits=key_limits,
    )
    # Leases the owner makes for HTTP workers skip its gates: each worker has its own.
    app.state.model_access = table_access
    access = fair_access_of(
        table_access,
        settings.fair_share,
        core.metrics,
        in_table(core.supervisor),
        share=core.workers,
    )
    app.state.key_limits = key_limits
    limits = request_limits_of(settings)
    screen = BodyScreen(settings.media_url_networks)
    app.include_router(
        build_openai_router(
            access, core.metrics, log_prompts=settings.log_prompts, limits=limits, screen=screen
        )
    )
    app.include_router(build_model_list_router(core.router, list_aliases=settings.list_aliases))
    # Every stored response lives here, in the owner (HTTP workers pass their requests on).
    stored = (
        ResponseOwners(settings.stored_responses, forget_in_table(core.router))
        if store_enabled()
        else None
    )
    app.state.stored_responses = stored
    app.include_router(
        build_vllm_router(
            access,
            core.metrics,
            log_prompts=settings.log_prompts,
            limits=limits,
            stored=stored,
            screen=screen,
            default_model=table_default_model(core.router),
        )
    )
    app.include_router(build_table_routes(core.router, access, core.metrics, stored=stored))
    app.include_router(build_tokenizer_info_router(core.router, access, core.metrics))
    app.include_router(
        build_ollama_router(
            access,
            core.metrics,
            keep_alive=keep_alive_in(core.supervisor),
            log_prompts=settings.log_prompts,
            limits=limits,
        )
    )
    app.include_router(build_ollama_table_router(core))
    app.include_router(build_admin_router(core))
    # Batch lines are answered by this app itself, as requests of their batch's key.
    batches = batch_runner_of(settings)
    batches.bind(app)
    app.include_router(build_batch_router(batches, settings.batches, core.router))
    app.include_router(build_hub_router(core))
    app.include_router(build_plan_router(core))
    app.include_router(build_docs_router(app.openapi))

    async def settle_figures() -> None:
        """HTTP workers hand over the figures of the requests they answered, before a read."""
        settle = getattr(app.state, "settle_workers", None)
        if settle is not None:
            await settle()

    app.include_router(build_usage_router(core.usage, settle=settle_figures))
    app.include_router(build_metrics_router(core.metrics, settle=settle_figures))
    # Added first, so it runs inside the request-context middleware (ids and access log).
    app.add_middleware(AuthMiddleware, config=settings.auth, limits=key_limits)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    if settings.status_page:
        # Outside the key check: the page is static files with no data in them; every figure
        # it shows comes from /admin and /metrics, which it calls with the key it asks for.
        app.add_middleware(StatusPage)
    # Outside CORS and the key check: a DNS-rebinding or cross-site request is refused first.
    app.add_middleware(
        CrossSiteGuard,
        allowed_hosts=settings.allowed_hosts or local_host_names(settings.host),
        cors_origins=settings.cors_origins,
    )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        observer=RequestObservers([core.metrics, core.usage]),
    )
    if core.workers > 1:
        app.add_middleware(NameTheWorker, index=0)
    # Outermost: only a worker of ours may say which client a passed-on request came from.
    app.add_middleware(TrustWorkers, token=worker_token)
    return app
