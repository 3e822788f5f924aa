"""Watching the table: failed engines restarted, idle models let go, remote health followed.

``Supervision.watch`` runs for the supervisor's life: every ``watch_interval_seconds`` it
marks dead engines failed (a restart follows, with backoff, up to ``restart_max_tries``),
lets a model whose ``keep_alive`` ran out sleep or unload, and turns each remote backend's
health into its entry's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from appliance.catalogue.schema import RemoteModelSpec
from appliance.errors import LifecycleError
from appliance.host.inventory import DeviceKind
from appliance.supervisor.handle import ModelHandle
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.supervisor.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")

S = ModelState


class Supervision:
    """Watches ``supervisor``'s table (its handles, limits, loads and unloads)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def mark_failed(self, handle: ModelHandle, reason: str) -> None:
        """A ready model's engine broke: mark it failed and restart it in the background."""
        if handle.state is not S.READY:
            return
        handle.last_error = reason
        handle.lifecycle.swap(S.READY, S.FAILED, reason)
        self._supervisor.background(self.restart(handle))

    async def restart(self, handle: ModelHandle) -> None:
        """Free a failed model's engine, then reload it with backoff until it is ready, it is
        no longer failed, the appliance closes, or ``restart_max_tries`` ran out."""
        supervisor = self._supervisor
        limits = supervisor.limits
        await supervisor.loading.release(handle)
        while not supervisor.closing and handle.state is S.FAILED:
            if handle.failures >= limits.restart_max_tries:
                log.error(
                    "model %s: giving up after %d restart(s); load it by hand once fixed",
                    handle.name,
                    handle.failures,
                    extra={"model": handle.name, "event": "restart_gave_up"},
                )
                return
            delay = limits.restart_backoff_seconds * (2**handle.failures)
            handle.failures += 1
            log.warning(
                "model %s: restarting in %.1fs (try %d of %d)",
                handle.name,
                delay,
                handle.failures,
                limits.restart_max_tries,
                extra={"model": handle.name, "event": "restart"},
            )
            await asyncio.sleep(delay)
            if supervisor.closing or handle.state is not S.FAILED:
                return
            if supervisor.observer is not None:
                supervisor.observer.on_restart(handle.name)
            failures = handle.failures
            with contextlib.suppress(Exception):
                await supervisor.loading.ensure_loading(handle, f"restart {failures} after failure")
            if handle.state is S.READY:
                return
            handle.failures = failures

    async def watch(self) -> None:
        """Find dead engines and idle models, every ``watch_interval_seconds``."""
        supervisor = self._supervisor
        while True:
            await asyncio.sleep(supervisor.limits.watch_interval_seconds)
            now = time.monotonic()
            for handle in supervisor.handles():
                if handle.local is None:
                    self.refresh_remote(handle)
                    continue
                if handle.state is not S.READY or handle.engine is None:
                    continue
                if not handle.engine.is_alive():
                    self.mark_failed(handle, "engine died")
                    continue
                keep_alive = handle.keep_alive()
                in_workers, last_used = supervisor.lending.worker_use(handle)
                idle = handle.in_flight + in_workers == 0 and now - last_used > (keep_alive or 0)
                if keep_alive is not None and idle:
                    supervisor.background(self._expire(handle, keep_alive))

    async def _expire(self, handle: ModelHandle, keep_alive: float) -> None:
        """keep_alive ran out: sleep at level 1 where the engine can and the host's sleep budget
        has room for its weights (a wake takes about a second, a reload tens of seconds), and
        unload only otherwise. On CPU (no sleep mode) that is always an unload."""
        supervisor = self._supervisor
        reason = f"idle for {keep_alive:.0f}s"
        can_sleep = (
            supervisor.inventory.kind is DeviceKind.GPU
            and handle.local is not None
            and bool(handle.local.engine.get("enable_sleep_mode"))
        )
        if can_sleep and handle.state is S.READY:
            try:
                await supervisor.sleep(handle.name, level=1)
                return
            except LifecycleError as exc:  # the host budget is full (or the state moved on)
                log.info(
                    "model %s: %s, and it cannot sleep (%s): unloading",
                    handle.name,
                    reason,
                    exc.message,
                    extra={"model": handle.name, "event": "keep_alive_unload"},
                )
        if handle.state is S.READY:
            await supervisor.unload(handle.name, reason=reason)

    def refresh_remote(self, handle: ModelHandle) -> None:
        """Follow a remote entry's backend even while no request comes (health checks)."""
        remotes = self._supervisor.remotes
        if remotes is not None and isinstance(handle.spec, RemoteModelSpec):
            handle.engine = remotes.get(handle.spec)
            self._supervisor.lending.follow_remote(handle)
