"""Every remote entry's engine, sharing one pooled httpx client (a guarded one for a
catalogue that came from the registry)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from appliance.catalogue.schema import ModelSpec, RemoteModelSpec
from appliance.engines.address_guard import AddressCheck, guarded_transport
from appliance.engines.remote.engine import RemoteEngine
from appliance.engines.remote.settings import RemoteSettings


def _serves(engine: RemoteEngine, spec: RemoteModelSpec) -> bool:
    """Whether ``engine`` proxies to the same backend and upstream model as ``spec`` says."""
    return engine.url == spec.backend_url and engine.spec.upstream_name == spec.upstream_name


class RemoteBackends:
    """Every remote model's engine, sharing one pooled httpx client."""

    def __init__(
        self,
        settings: RemoteSettings | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        guard: AddressCheck | None = None,
    ) -> None:
        """``client``: bring your own (you close it); by default one is made and owned here.
        ``guard``: the address check for untrusted (registry) backends' connections; their
        own client, made here, applies it at every connect."""
        self.settings = settings or RemoteSettings()
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_connections,
            keepalive_expiry=30.0,
        )
        timeout = httpx.Timeout(s.read_timeout, connect=s.connect_timeout)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, limits=limits)
        self._guarded_client = (
            httpx.AsyncClient(timeout=timeout, transport=guarded_transport(guard, limits))
            if guard is not None
            else None
        )
        self._untrusted = False  # whether the catalogue in force came from the registry
        self._engines: dict[str, RemoteEngine] = {}
        self._started = False

    def _client_for_catalogue(self) -> httpx.AsyncClient:
        if self._untrusted and self._guarded_client is not None:
            return self._guarded_client
        return self._client

    def get(self, spec: RemoteModelSpec) -> RemoteEngine:
        """The engine for ``spec``, made on first use (or anew when its URL changed)."""
        engine = self._engines.get(spec.name)
        client = self._client_for_catalogue()
        if engine is not None and _serves(engine, spec) and engine.client is client:
            return engine
        if engine is not None:
            # A replaced engine's requests in flight finish on the shared client.
            engine.cancel_health_check()
        engine = RemoteEngine(spec, client, self.settings)
        self._engines[spec.name] = engine
        if self._started:
            engine.start_health_check()
        return engine

    async def sync(
        self, specs: Iterable[ModelSpec], *, untrusted: bool = False
    ) -> dict[str, list[str]]:
        """Match the catalogue: add new remote entries, drop removed ones, replace moved ones.

        ``untrusted``: the catalogue came from the registry, so its backends connect through
        the guarded client (engines move to it when this changes)."""
        self._untrusted = untrusted
        wanted = {spec.name: spec for spec in specs if isinstance(spec, RemoteModelSpec)}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "replaced": []}
        for name in sorted(set(self._engines) - set(wanted)):
            await self._engines.pop(name).stop()
            changes["removed"].append(name)
        for name, spec in sorted(wanted.items()):
            old = self._engines.get(name)
            if old is None:
                changes["added"].append(name)
            elif not _serves(old, spec) or old.client is not self._client_for_catalogue():
                await old.stop()
                del self._engines[name]
                changes["replaced"].append(name)
            self.get(spec)
        return changes

    async def start(self) -> None:
        """Start the health checks of every engine, now and as engines are added."""
        self._started = True
        for engine in self._engines.values():
            await engine.start()

    async def close(self) -> None:
        """Stop every engine's health check and close the client if it is ours."""
        self._started = False
        for engine in self._engines.values():
            await engine.stop()
        self._engines.clear()
        if self._owns_client:
            await self._client.aclose()
        if self._guarded_client is not None:
            await self._guarded_client.aclose()

    def health(self, spec: RemoteModelSpec) -> dict[str, Any]:
        """The health of ``spec``'s backend: up, breaker state, the last error."""
        engine = self.get(spec)
        return {
            "up": engine.up,
            "breaker": engine.breaker.state.value,
            "last_error": engine.last_error,
        }

    def status(self) -> dict[str, dict[str, Any]]:
        """Per remote model: backend URL, up, breaker state, last error, requests in flight."""
        return {
            name: {
                "backend_url": engine.url,
                "up": engine.up,
                "breaker": engine.breaker.state.value,
                "last_error": engine.last_error,
                "in_flight": engine.stats().running,
            }
            for name, engine in sorted(self._engines.items())
        }

    def up(self) -> dict[str, bool]:
        """Per remote model: whether its backend is up (``appliance_remote_backend_up``)."""
        return {name: engine.up for name, engine in sorted(self._engines.items())}
