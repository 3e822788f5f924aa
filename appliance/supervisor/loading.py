"""Moving one local model's engine through its life: load, sleep, wake, unload.

``Loading`` carries out what ``Room`` plans: a load fetches missing files (the
``downloading`` state), makes room (sleeping, then evicting), starts the engine under its
devices' locks and restores run-time adapters; a sleep or an unload drains the requests in
flight first (bounded); a wake gets its memory back on the same devices. Every state change
goes through ``Lifecycle.swap``; a sleep or wake that breaks the engine starts a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from appliance.engines.base import Sleeps, TakesAdapters
from appliance.errors import (
    ApplianceError,
    EvictionTooSoonError,
    InsufficientResourcesError,
    LifecycleError,
    NotSupportedError,
)
from appliance.host.device_locks import DeviceChange
from appliance.host.downloads import DownloadProgress, WeightsFetcher
from appliance.host.inventory import DeviceKind
from appliance.host.placement import Allocation, Demand, PlacementError
from appliance.supervisor.handle import EngineMaker, ModelHandle
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.supervisor.supervisor import Supervisor

log = logging.getLogger("appliance.supervisor")

S = ModelState


class Loading:
    """Loads, sleeps, wakes and unloads the local models of ``supervisor``'s table.

    ``engines`` makes their engines; ``fetcher`` downloads a model's missing files before it
    loads (None: the engine's own start fetches them, with no ``downloading`` state).
    """

    def __init__(
        self, supervisor: Supervisor, engines: EngineMaker, fetcher: WeightsFetcher | None
    ) -> None:
        self._supervisor = supervisor
        self._engines = engines
        self._fetcher = fetcher

    # -- loading ---------------------------------------------------------------------------

    async def load(self, name: str) -> ModelHandle:
        """Load ``name`` (or wait for the load under way); return its handle once ready."""
        handle, _ = self._supervisor.get_local(name)
        if handle.state is S.READY:
            return handle
        if handle.state is S.DRAINING:
            raise LifecycleError(f"model {name!r} is draining; load it again once it is unloaded")
        if handle.state is S.SLEEPING:
            await asyncio.shield(self.ensure_waking(handle, "load requested while asleep"))
            return handle
        await asyncio.shield(self.ensure_loading(handle, "load requested"))
        return handle

    def ensure_loading(self, handle: ModelHandle, reason: str) -> asyncio.Task[None]:
        """The load task of ``handle``, started if none runs; callers may await it."""
        if handle.load_task is None or handle.load_task.done():
            handle.load_task = asyncio.create_task(
                self._load(handle, reason), name=f"load-{handle.name}"
            )
        return handle.load_task

    async def _load(self, handle: ModelHandle, reason: str) -> None:
        supervisor = self._supervisor
        spec = handle.local
        assert spec is not None, "only local models load"
        fetcher = self._fetcher
        # A Ray entry's replicas fetch their own files, on the cluster's nodes.
        downloading = fetcher is not None and spec.ray is None and fetcher.missing(spec)
        first = S.DOWNLOADING if downloading else S.LOADING
        handle.lifecycle.swap((S.UNLOADED, S.FAILED), first, reason)
        started = time.monotonic()
        try:
            if fetcher is not None and downloading:
                # Before placement: a long download holds no device and evicts nobody.
                handle.download = DownloadProgress()
                await fetcher.fetch(spec, handle.download)
                handle.lifecycle.swap(S.DOWNLOADING, S.LOADING, "files downloaded")
            if spec.ray is not None:
                # It runs on the Ray cluster: nothing of this host is placed, locked or evicted.
                engine = self._engines.create(spec, None, supervisor.inventory)
                await engine.start()
            else:
                demand = supervisor.capacity.demand(spec)
                demand = supervisor.startup.follow(demand, supervisor.room.allocations(handle.name))
                allocation = await self._make_room(handle, demand)
                engine = self._engines.create(spec, allocation, supervisor.inventory)
                async with supervisor.capacity.locks.hold(allocation.devices, DeviceChange.START):
                    supervisor.capacity.check_free(allocation)
                    await engine.start()
        except BaseException as exc:
            handle.allocation = None
            cancelled = not isinstance(exc, Exception)
            handle.last_error = "load cancelled" if cancelled else str(exc)
            # Nothing broke when a load is cancelled or the model does not fit now.
            no_room = isinstance(exc, (InsufficientResourcesError, EvictionTooSoonError))
            target = S.UNLOADED if cancelled or no_room else S.FAILED
            handle.lifecycle.swap((S.DOWNLOADING, S.LOADING), target, handle.last_error)
            raise
        # Adapters loaded at run time (declared ones came with the engine's arguments).
        declared = set(spec.adapter_names())
        for name, source in list(handle.adapters.items()):
            if name not in declared and isinstance(engine, TakesAdapters):
                try:
                    await engine.load_adapter(
                        name, self._engines.adapter_source(spec.name, name, source)
                    )
                except ApplianceError as exc:
                    log.error("model %s: adapter %s not restored: %s", spec.name, name, exc)
                    handle.adapters.pop(name, None)
        handle.engine = engine
        handle.load_seconds = time.monotonic() - started
        handle.last_used = handle.ready_since = time.monotonic()
        handle.last_error = None
        handle.failures = 0
        handle.lifecycle.swap(S.LOADING, S.READY, f"loaded in {handle.load_seconds:.1f}s")
        if supervisor.observer is not None:
            supervisor.observer.on_load(handle.name, handle.load_seconds)

    async def _make_room(self, handle: ModelHandle, demand: Demand) -> Allocation:
        """Place ``demand`` for ``handle``, sleeping or evicting what must go; reserve it on the
        handle. Sleeping comes first (a wake is about a second, a reload tens of seconds);
        evictable models are unloaded only when sleeping cannot make the room.

        The reservation is made before the slow start, so concurrent loads see it taken.
        """
        room = self._supervisor.room
        asleep = room.plan_sleep(handle, demand)
        if asleep is not None:
            allocation, sleepers = asleep
            handle.allocation = allocation
            handle.evicted = []
            for name in sleepers:
                log.info("putting %s to sleep to make room for %s", name, handle.name)
                await self.sleep(name, level=1)
            return allocation
        allocation, evicted = room.plan(handle, demand)
        handle.allocation = allocation
        handle.evicted = list(evicted)
        observer = self._supervisor.observer
        for victim in evicted:
            log.info("evicting %s to make room for %s", victim, handle.name)
            if observer is not None:
                observer.on_eviction(victim)
            await self.unload(victim, reason=f"evicted to make room for {handle.name}")
        return allocation

    # -- sleep mode (GPU only) -------------------------------------------------------------

    async def sleep(self, name: str, level: int = 1) -> ModelHandle:
        """Put a ready model to sleep with vLLM's sleep mode: GPU memory freed, engine kept.

        Level 1 keeps the weights in CPU memory (fast wake), level 2 drops them. New requests
        are refused from the start; those in flight get ``drain_seconds`` to finish.
        """
        supervisor = self._supervisor
        handle, spec = supervisor.get_local(name)
        if supervisor.inventory.kind is not DeviceKind.GPU:
            raise NotSupportedError(
                "sleep mode needs a GPU (vLLM's sleep mode is CUDA-only); this appliance runs "
                f"on {supervisor.inventory.kind.value}: use `appliance models unload {name}` "
                "instead"
            )
        if level not in (1, 2):
            raise LifecycleError(f"sleep level must be 1 or 2, not {level}")
        if not spec.engine.get("enable_sleep_mode"):
            raise LifecycleError(
                f"model {name!r} was not started with sleep mode; add "
                "`enable_sleep_mode: true` to its engine settings"
            )
        if handle.state is S.SLEEPING:
            return handle
        if handle.state is not S.READY or handle.engine is None:
            raise LifecycleError(
                f"model {name!r} is {handle.state.value}; only a ready model sleeps"
            )
        if not isinstance(handle.engine, Sleeps):
            raise NotSupportedError(f"model {name!r}: its engine has no sleep mode")
        engine, allocation = handle.engine, handle.allocation
        assert allocation is not None, "a ready model holds its allocation"
        host_gib = supervisor.room.host_gib_for_sleep(handle, engine, level)
        handle.lifecycle.swap(S.READY, S.SLEEPING, f"sleep level {level} requested")
        with contextlib.suppress(asyncio.TimeoutError):
            await supervisor.lending.drained(handle, supervisor.limits.drain_seconds)
        try:
            async with supervisor.capacity.locks.hold(allocation.devices, DeviceChange.SLEEP):
                await supervisor.capacity.sleep(handle.name, engine, allocation, level)
        except Exception as exc:
            handle.last_error = f"sleep failed: {exc}"
            handle.lifecycle.swap(S.SLEEPING, S.FAILED, handle.last_error)
            supervisor.background(supervisor.supervision.restart(handle))
            raise
        # Asleep, the engine holds what its sleep was measured to leave on the GPUs: the rest
        # is free for others, and the weights (level 1) count against the host's budget.
        handle.allocation = supervisor.capacity.asleep(allocation)
        handle.sleep_level = level
        handle.host_gib = host_gib
        return handle

    async def wake(self, name: str) -> ModelHandle:
        """Wake a sleeping model (or wait for the wake under way)."""
        handle, _ = self._supervisor.get_local(name)
        if handle.state is S.READY:
            return handle
        if handle.state not in (S.SLEEPING, S.LOADING):
            raise LifecycleError(f"model {name!r} is {handle.state.value}, not asleep")
        if handle.state is S.SLEEPING:
            await asyncio.shield(self.ensure_waking(handle, "wake requested"))
        elif handle.load_task is not None:
            await asyncio.shield(handle.load_task)
        return handle

    def ensure_waking(self, handle: ModelHandle, reason: str) -> asyncio.Task[None]:
        """The wake task of ``handle``, started if none runs; callers may await it."""
        if handle.load_task is None or handle.load_task.done():
            handle.load_task = asyncio.create_task(
                self._wake(handle, reason), name=f"wake-{handle.name}"
            )
        return handle.load_task

    async def _wake(self, handle: ModelHandle, reason: str) -> None:
        supervisor = self._supervisor
        engine, asleep = handle.engine, handle.allocation
        assert isinstance(engine, Sleeps) and asleep is not None, "a sleeper keeps its engine"
        # Its engine is bound to its devices: the whole reservation must come back there.
        demand = Demand(
            model=handle.name,
            tensor_parallel_size=len(asleep.devices),
            memory_share=asleep.memory_share,
            devices=asleep.devices,
        )
        try:
            # Checked before the state changes (nothing awaits in between): a wake that
            # cannot get its memory back leaves the model asleep, and says why.
            supervisor.room.plan(handle, demand)
        except (PlacementError, EvictionTooSoonError) as exc:
            handle.last_error = f"cannot wake: {exc.message}"
            raise
        handle.lifecycle.swap(S.SLEEPING, S.LOADING, reason)
        started = time.monotonic()
        try:
            await self._make_room(handle, demand)
            async with supervisor.capacity.locks.hold(asleep.devices, DeviceChange.WAKE):
                supervisor.capacity.check_free(handle.allocation)
                await engine.wake_up()
        except Exception as exc:
            handle.last_error = f"wake failed: {exc}"
            handle.lifecycle.swap(S.LOADING, S.FAILED, handle.last_error)
            supervisor.background(supervisor.supervision.restart(handle))
            raise
        handle.sleep_level = 0
        handle.host_gib = 0.0
        handle.last_used = handle.ready_since = time.monotonic()
        handle.wake_seconds = handle.last_used - started
        handle.lifecycle.swap(S.LOADING, S.READY, f"awake in {handle.wake_seconds:.1f}s")

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, name: str, *, reason: str = "unload requested") -> ModelHandle:
        """Drain ``name`` (bounded), then shut its engine down and free its devices."""
        supervisor = self._supervisor
        drain_seconds = supervisor.limits.drain_seconds
        handle, _ = supervisor.get_local(name)
        if handle.state is S.DOWNLOADING and handle.load_task is not None:
            # Nothing to drain or stop yet: cancel the download (it stops between files).
            handle.load_task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(handle.load_task)
        if handle.state is S.LOADING and handle.load_task is not None:
            # Let the load finish (or fail) so its engine is not left behind half-built.
            with contextlib.suppress(Exception):
                await asyncio.shield(handle.load_task)
        if handle.state in (S.UNLOADED, S.DRAINING):
            if handle.state is S.DRAINING:
                await handle.lifecycle.wait_for((S.UNLOADED, S.FAILED), drain_seconds)
            return handle
        if handle.state is S.FAILED:
            await self.release(handle)
            handle.lifecycle.swap(S.FAILED, S.UNLOADED, reason)
            return handle
        handle.lifecycle.swap((S.READY, S.SLEEPING), S.DRAINING, reason)
        try:
            await supervisor.lending.drained(handle, drain_seconds)
        except asyncio.TimeoutError:
            log.warning(
                "model %s: %d request(s) still running after %.0fs of draining; stopping anyway",
                name,
                handle.in_flight,
                drain_seconds,
                extra={"model": name, "event": "drain_timeout"},
            )
        await self.release(handle)
        handle.lifecycle.swap(S.DRAINING, S.UNLOADED, reason)
        return handle

    async def release(self, handle: ModelHandle) -> None:
        """Stop ``handle``'s engine (under its devices' locks) and free what it held."""
        engine, handle.engine = handle.engine, None
        allocation, handle.allocation = handle.allocation, None
        handle.sleep_level = 0
        handle.host_gib = 0.0
        if engine is not None:
            devices = allocation.devices if allocation is not None else ()
            try:
                async with self._supervisor.capacity.locks.hold(devices, DeviceChange.STOP):
                    await self._supervisor.capacity.stop(handle.name, engine, allocation)
            except Exception as exc:  # a dead engine may fail to stop cleanly; it is gone anyway
                log.warning("model %s: engine stop raised %r", handle.name, exc)
