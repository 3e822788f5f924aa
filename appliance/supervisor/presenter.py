"""The one status JSON of a model: what the admin API, the CLI and the status page show.

``Presenter.describe`` is a model's entry (its catalogue facts, names, adapters, state, load,
devices and, for a remote backend, its health); ``status`` the state and load part of it;
``engine_stats`` its engine's figures with the requests of every HTTP process counted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.engines.base import EngineStats
from appliance.supervisor.handle import ModelHandle
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.supervisor.supervisor import Supervisor

S = ModelState


class Presenter:
    """Describes the entries of ``supervisor``'s table as plain JSON data."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self, name: str) -> dict[str, Any]:
        """Everything known about ``name``, as plain JSON data: the one presenter of a model's
        status (the admin API, ``appliance models list|ps`` and the status page read it)."""
        supervisor = self._supervisor
        handle = supervisor.get(name)
        spec = handle.spec
        entry: dict[str, Any] = {
            "name": spec.name,
            "kind": "local" if handle.local is not None else "remote",
            "version": spec.version,
            "owner": spec.owner,
            "task": spec.task.value,
            "aliases": supervisor.names.aliases_of(name),
            "adapters": [{"name": a, "source": s} for a, s in handle.adapters.items()],
            "max_queue": spec.max_queue or supervisor.limits.max_queue,
        }
        if isinstance(spec, LocalModelSpec):
            entry.update(
                autoload=spec.autoload,
                load_on_demand=spec.load_on_demand,
                evictable=spec.evictable,
                keep_alive=spec.keep_alive,
                source=spec.source,
            )
        else:
            supervisor.supervision.refresh_remote(handle)
            entry["backend_url"] = spec.backend_url
            entry["backend_model"] = spec.upstream_name
        entry.update(self.status(handle))
        if isinstance(spec, RemoteModelSpec) and supervisor.remotes is not None:
            # The backend's own health: up, its breaker, why it last failed.
            entry.update(supervisor.remotes.health(spec))
        # Per device, in the order of "devices": what the status page draws its bars from.
        entry["reserved_gib"] = list(handle.allocation.reserved_gib) if handle.allocation else []
        return entry

    def engine_stats(self, handle: ModelHandle) -> EngineStats | None:
        """The load of ``handle``'s engine (None without one): its own figures, with the
        requests HTTP workers have in flight on it counted as running, and waiting and
        KV-cache usage from the freshest scheduler figures any HTTP process's client got
        (each engine step's go to one client only)."""
        engine = handle.engine
        if engine is None:
            return None
        supervisor = self._supervisor
        stats = engine.stats()
        snapshots = (stats.scheduler, supervisor.peer_scheduler(engine))
        fresh = max((s for s in snapshots if s is not None), key=lambda s: s.at, default=None)
        if fresh is not None:
            # With one client these are the engine's own gauges; with several, the engine
            # leaves them empty (its snapshot may be older than a worker's).
            stats = dataclasses.replace(
                stats, waiting=fresh.waiting, kv_cache_usage=fresh.kv_cache_usage, scheduler=fresh
            )
        peers = supervisor.peer_running(handle.name) + supervisor.lending.worker_use(handle)[0]
        return dataclasses.replace(stats, running=stats.running + peers) if peers else stats

    def status(self, handle: ModelHandle) -> dict[str, Any]:
        """The state and load of one model (part of :meth:`describe`)."""
        allocation = handle.allocation
        stats = self.engine_stats(handle)
        return {
            "state": handle.state.value,
            "since_seconds": round(time.monotonic() - handle.lifecycle.since, 3),
            "device_kind": self._supervisor.inventory.kind.value,
            "devices": list(allocation.devices) if allocation else [],
            "memory_gib": allocation.memory_gib if allocation else None,
            "memory_share": round(allocation.memory_share, 4) if allocation else None,
            "sleep_level": handle.sleep_level or None,
            "host_memory_gib": round(handle.host_gib, 3) if handle.host_gib else None,
            "load_seconds": round(handle.load_seconds, 3) if handle.load_seconds else None,
            "wake_seconds": round(handle.wake_seconds, 3) if handle.wake_seconds else None,
            "in_flight": self._supervisor.lending.in_flight(handle),
            "engine_running": stats.running if stats else 0,
            "engine_waiting": stats.waiting if stats else 0,
            "last_error": handle.last_error,
            "restarts": handle.failures,
            "download": (
                handle.download.as_status()
                if handle.download is not None and handle.state is S.DOWNLOADING
                else None
            ),
        }
