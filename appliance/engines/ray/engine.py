"""A catalogue entry served by a Ray Serve LLM app on the operator's Ray cluster.

Start deploys the entry (or adopts the app a previous run of the appliance left, when its
route prefix carries the same fingerprint) and waits until Serve calls it healthy: the model
is ``loading`` meanwhile. Requests go to Ray Serve's HTTP proxy (on the head node, on
loopback) through the remote relay (``appliance.engines.remote``: httpx, SSE bytes passed
through), so keys, limits, quotas, usage and metrics apply as to any entry. Ray Serve spreads
them over the replicas and replaces a replica that dies. Stop deletes the app, except when the
appliance itself is shutting down (``RayApps.keep_running``): then the app stays for the next
run to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from starlette.requests import Request

from appliance.catalogue.ray_settings import RayCluster
from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.engines.base import EngineStats, Reply, RouteCall
from appliance.engines.ray.cluster import DEPLOYING, FAILED_STATES, RUNNING, AppInfo, RayServe
from appliance.engines.ray.mapping import RAY_ROUTES, app_name, llm_config, route_prefix
from appliance.engines.remote import RemoteBackends, RemoteEngine, RemoteSettings
from appliance.errors import EngineError, NotSupportedError

log = logging.getLogger("appliance.ray")

POLL_SECONDS = 1.0  # how often a deploying app's state is read
WATCH_SECONDS = 5.0  # how often a running app is checked (is_alive reads the last answer)


class RayApps:
    """What every Ray entry of one appliance shares: the cluster connection, and whether
    their apps outlive the appliance's shutdown."""

    def __init__(self, cluster: RayCluster, remote: RemoteSettings | None = None) -> None:
        self.serve = RayServe(cluster)
        # The relay's own health check reads the backend's /health, which a Serve app has
        # not; the app's state, read from Serve, says whether it is alive instead.
        self.remote = dataclasses.replace(remote or RemoteSettings(), health_interval=None)
        self.keep_running = False  # set when the appliance shuts down

    def keep_apps_running(self) -> None:
        """From now on a stopping engine leaves its app on the cluster (for the next run)."""
        self.keep_running = True


class RayEngine:
    """One ``ray:`` entry, deployed on Ray Serve LLM and relayed to over loopback HTTP."""

    def __init__(self, spec: LocalModelSpec, source: str, apps: RayApps) -> None:
        self.spec = spec
        self._apps = apps
        self.config = llm_config(spec, source)
        self.name = app_name(spec)
        self.prefix = route_prefix(spec, self.config)
        self.adopted = False  # whether start found the app already running
        self._backends: RemoteBackends | None = None
        self._relay: RemoteEngine | None = None
        self._app: AppInfo | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Deploy or adopt the app, and wait (bounded) until Serve reports it running."""
        serve = self._apps.serve
        proxy = await asyncio.to_thread(serve.connect)
        found = await asyncio.to_thread(serve.app, self.name)
        if (
            found is not None
            and found.route_prefix == self.prefix
            and found.status in (RUNNING, DEPLOYING)
        ):
            self.adopted = True
            log.info(
                "model %s: adopting Ray Serve app %r (%s)", self.spec.name, self.name, found.status
            )
        else:
            why = "new" if found is None else f"was {found.status} at {found.route_prefix}"
            log.info("model %s: deploying Ray Serve app %r (%s)", self.spec.name, self.name, why)
            await asyncio.to_thread(serve.deploy, self.name, self.config, self.prefix)
        self._app = await self._until_running()
        self._backends = RemoteBackends(self._apps.remote)
        self._relay = self._backends.get(
            RemoteModelSpec(name=self.spec.name, backend_url=proxy + self.prefix)
        )
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_loop(), name=f"ray-watch-{self.spec.name}"
        )

    async def _until_running(self) -> AppInfo:
        deadline = time.monotonic() + self._apps.serve.cluster.deploy_timeout
        while True:
            app = await asyncio.to_thread(self._apps.serve.app, self.name)
            if app is not None and app.status == RUNNING:
                return app
            if app is not None and app.status in FAILED_STATES:
                raise EngineError(
                    f"model {self.spec.name!r}: Ray Serve app {self.name!r} is {app.status}: "
                    f"{app.message[:2000]}"
                )
            if time.monotonic() > deadline:
                state = "gone" if app is None else app.status
                raise EngineError(
                    f"model {self.spec.name!r}: Ray Serve app {self.name!r} not running after "
                    f"{self._apps.serve.cluster.deploy_timeout:.0f}s (it is {state})"
                )
            await asyncio.sleep(POLL_SECONDS)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                self._app = await asyncio.to_thread(self._apps.serve.app, self.name)
            except Exception as exc:  # the cluster did not answer: say so, keep the last state
                log.warning("model %s: Ray Serve status unreadable: %r", self.spec.name, exc)

    async def stop(self) -> None:
        """Delete the app (unless the appliance is shutting down) and close the relay."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        backends, self._backends, self._relay = self._backends, None, None
        if backends is not None:
            await backends.close()
        if self._apps.keep_running:
            log.info("model %s: leaving Ray Serve app %r running", self.spec.name, self.name)
            return
        if self._app is not None or self.adopted:
            self._app = None
            await asyncio.to_thread(self._apps.serve.delete, self.name)

    def is_alive(self) -> bool:
        """False once the app is gone or failed for good; a replica Ray is replacing (the app
        briefly ``DEPLOYING`` or ``UNHEALTHY``) is Ray's to fix, not a dead engine."""
        app = self._app
        return app is not None and app.status not in FAILED_STATES

    # -- requests --------------------------------------------------------------------------

    def _relayed(self) -> RemoteEngine:
        if self._relay is None:
            raise EngineError(f"model {self.spec.name!r}: its Ray Serve app is not running")
        return self._relay

    def routes(self) -> frozenset[str]:
        """What Ray Serve LLM's ingress serves; other routes are refused naming these."""
        return RAY_ROUTES

    async def serve(self, call: RouteCall, request: Request) -> Reply:
        """Relay ``call`` to the same route of the app's ingress."""
        if call.route not in RAY_ROUTES:
            raise NotSupportedError(
                f"model {self.spec.name!r} runs on Ray Serve LLM, which does not serve "
                f"{call.path}; it serves: {', '.join(sorted(RAY_ROUTES))}"
            )
        return await self._relayed().serve(call, request)

    def stats(self) -> EngineStats:
        """Requests this appliance has in flight on the app."""
        return EngineStats(running=self._relay.stats().running) if self._relay else EngineStats()
