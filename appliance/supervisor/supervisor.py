"""The supervisor: owns every local model's engine and its lifecycle.

It places models on devices, loads and unloads them (draining first), lends them to requests
(``acquire``), watches engines and restarts the ones that die, unloads idle models with a
``keep_alive``, and applies a changed catalogue without touching what did not change. Every
state change goes through ``Lifecycle.swap`` and is logged and reported to the observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from appliance.catalogue.schema import ModelSpec
from appliance.engines.base import Engine
from appliance.errors import (
    ApplianceError,
    EvictionTooSoonError,
    InsufficientResourcesError,
    LifecycleError,
    ModelDrainingError,
    ModelFailedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelUnloadedError,
    NotSupportedError,
    RateLimitedError,
)
from appliance.supervisor.capacity import HostCapacity
from appliance.supervisor.device_locks import DeviceChange
from appliance.supervisor.handle import (
    EngineMaker,
    ModelHandle,
    SupervisorLimits,
    SupervisorObserver,
)
from appliance.supervisor.inventory import DeviceKind, Inventory
from appliance.supervisor.placement import Allocation, Demand, PlacementError
from appliance.supervisor.states import Lifecycle, ModelState, Transition

log = logging.getLogger("appliance.supervisor")

S = ModelState


class Supervisor:
    """Owns the local models' engines; see the module docstring."""

    def __init__(
        self,
        inventory: Inventory,
        engines: EngineMaker,
        *,
        limits: SupervisorLimits | None = None,
        observer: SupervisorObserver | None = None,
        capacity: HostCapacity | None = None,
    ) -> None:
        """``capacity`` places engines on ``inventory`` (default: the default policy there)."""
        self.inventory = inventory
        self.limits = limits or SupervisorLimits()
        self.capacity = capacity or HostCapacity(
            inventory,
            default_share=self.limits.default_memory_share,
            cpu_default_gib=self.limits.cpu_default_model_gib,
        )
        self._engines = engines
        self._observer = observer
        self._models: dict[str, ModelHandle] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._autoload: asyncio.Future[list[Any]] | None = None

    # -- catalogue -------------------------------------------------------------------------

    def _new_handle(self, spec: ModelSpec) -> ModelHandle:
        handle = ModelHandle(spec=spec, lifecycle=Lifecycle(spec.name, self._on_transition))
        handle.idle.set()
        return handle

    def _on_transition(self, transition: Transition) -> None:
        log.info(
            "model %s: %s -> %s (%s)",
            transition.model,
            transition.old.value,
            transition.new.value,
            transition.reason,
            extra={
                "event": "model_state",
                "model": transition.model,
                "from_state": transition.old.value,
                "to_state": transition.new.value,
                "reason": transition.reason,
                "seconds_in_previous": round(transition.seconds_in_old, 3),
            },
        )
        if self._observer is not None:
            self._observer.on_transition(transition)

    def handles(self) -> list[ModelHandle]:
        """Every local model, in catalogue order."""
        return list(self._models.values())

    def get(self, name: str) -> ModelHandle:
        """The handle of local model ``name``; ``ModelNotFoundError`` if there is none."""
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFoundError(f"model {name!r} is not a local model of this appliance")
        return handle

    async def start(self, specs: Iterable[ModelSpec]) -> None:
        """Take the catalogue's local models, start watching, and start the autoload loads.

        Returns at once; ``wait_autoload`` waits for the loads to end.
        """
        for spec in specs:
            if spec.is_local:
                self._models[spec.name] = self._new_handle(spec)
        self._watch_task = asyncio.create_task(self._watch(), name="supervisor-watch")
        loads = [
            self._ensure_loading(handle, "autoload at start")
            for handle in self._models.values()
            if handle.spec.autoload
        ]
        # Autoload failures are already logged and visible as `failed`; the API serves anyway.
        self._autoload = asyncio.gather(*loads, return_exceptions=True)

    async def wait_autoload(self) -> None:
        """Wait until every autoload model started by ``start`` is ready or failed."""
        if self._autoload is not None:
            await asyncio.shield(self._autoload)

    async def apply_catalogue(self, specs: Iterable[ModelSpec]) -> dict[str, list[str]]:
        """Apply a new catalogue, touching only what changed; return what was done.

        Every entry is validated first: an invalid catalogue changes nothing.
        """
        wanted = {spec.name: spec for spec in specs if spec.is_local}
        for spec in wanted.values():
            self._engines.validate(spec)
        added = [name for name in wanted if name not in self._models]
        removed = [name for name in self._models if name not in wanted]
        changed = [
            name
            for name in wanted
            if name in self._models and self._models[name].spec != wanted[name]
        ]

        async def remove(name: str) -> None:
            await self.unload(name, reason="removed from the catalogue")
            self._models.pop(name, None)

        async def replace(name: str) -> None:
            was_serving = self._models[name].state in (S.READY, S.LOADING, S.SLEEPING)
            await self.unload(name, reason="changed in the catalogue")
            self._models[name] = self._new_handle(wanted[name])
            if was_serving or wanted[name].autoload:
                await self._ensure_loading(self._models[name], "reloaded after a change")

        async def add(name: str) -> None:
            self._models[name] = self._new_handle(wanted[name])
            if wanted[name].autoload:
                await self._ensure_loading(self._models[name], "added to the catalogue")

        # Removals first, so added models can use the memory they free.
        results = await asyncio.gather(*(remove(n) for n in removed), return_exceptions=True)
        results += await asyncio.gather(
            *(replace(n) for n in changed), *(add(n) for n in added), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ApplianceError):
                log.error("catalogue change failed: %r", result)
        # Keep catalogue order for listings.
        self._models = {n: self._models[n] for n in wanted if n in self._models}
        return {"added": added, "removed": removed, "changed": changed}

    # -- loading ---------------------------------------------------------------------------

    def _ensure_loading(self, handle: ModelHandle, reason: str) -> asyncio.Task[None]:
        """The load task of ``handle``, started if none runs; callers may await it."""
        if handle.load_task is None or handle.load_task.done():
            handle.load_task = asyncio.create_task(
                self._load(handle, reason), name=f"load-{handle.name}"
            )
        return handle.load_task

    def _allocations(self, excluding: str) -> list[Allocation]:
        return [
            h.allocation
            for h in self._models.values()
            if h.allocation is not None and h.name != excluding
        ]

    async def _load(self, handle: ModelHandle, reason: str) -> None:
        handle.lifecycle.swap((S.UNLOADED, S.FAILED), S.LOADING, reason)
        started = time.monotonic()
        try:
            allocation = await self._make_room(handle, self.capacity.demand(handle.spec))
            engine = self._engines.create(handle.spec, allocation, self.inventory)
            async with self.capacity.locks.hold(allocation.devices, DeviceChange.START):
                self.capacity.check_free(allocation)
                await engine.start()
        except BaseException as exc:
            handle.allocation = None
            cancelled = not isinstance(exc, Exception)
            handle.last_error = "load cancelled" if cancelled else str(exc)
            # Nothing broke when a load is cancelled or the model does not fit now.
            no_room = isinstance(exc, (InsufficientResourcesError, EvictionTooSoonError))
            target = S.UNLOADED if cancelled or no_room else S.FAILED
            handle.lifecycle.swap(S.LOADING, target, handle.last_error)
            raise
        handle.engine = engine
        handle.load_seconds = time.monotonic() - started
        handle.last_used = handle.ready_since = time.monotonic()
        handle.last_error = None
        handle.failures = 0
        handle.lifecycle.swap(S.LOADING, S.READY, f"loaded in {handle.load_seconds:.1f}s")
        if self._observer is not None:
            self._observer.on_load(handle.name, handle.load_seconds)

    async def _make_room(self, handle: ModelHandle, demand: Demand) -> Allocation:
        """Place ``demand`` for ``handle``, evicting what must go; reserve it on the handle.

        The reservation is made before the slow start, so concurrent loads see it taken.
        """
        allocation, evicted = self._plan(handle, demand)
        handle.allocation = allocation
        handle.evicted = list(evicted)
        for victim in evicted:
            log.info("evicting %s to make room for %s", victim, handle.name)
            if self._observer is not None:
                self._observer.on_eviction(victim)
            await self.unload(victim, reason=f"evicted to make room for {handle.name}")
        return allocation

    def _plan(self, handle: ModelHandle, demand: Demand) -> tuple[Allocation, list[str]]:
        """Where ``demand`` would go now, and what would be evicted for it; changes nothing.

        Ready and sleeping evictable models may be evicted, once they have been resident for
        ``min_resident_seconds``. When only younger ones stand in the way, the answer is a 503
        with Retry-After for when they may go, not a 507: the model will fit then.
        """
        now = time.monotonic()
        minimum = self.limits.min_resident_seconds
        candidates = [
            h
            for h in self._models.values()
            if h.spec.evictable and h.state in (S.READY, S.SLEEPING) and h.name != handle.name
        ]
        allocations = self._allocations(handle.name)
        settled = {h.name: h.last_used for h in candidates if now - h.ready_since >= minimum}
        try:
            return self.capacity.plan(demand, allocations, settled)
        except PlacementError:
            if len(settled) == len(candidates):
                raise
            # Raises PlacementError again when even evicting the young ones would not help.
            _, victims = self.capacity.plan(
                demand, allocations, {h.name: h.last_used for h in candidates}
            )
        young = {h.name: h for h in candidates if h.name not in settled}
        waits = [minimum - (now - young[v].ready_since) for v in victims if v in young]
        wait = max(1.0, *waits)
        names = ", ".join(repr(v) for v in sorted(victims) if v in young)
        raise EvictionTooSoonError(
            f"model {handle.name!r} needs the room of {names}, loaded less than "
            f"{minimum:g}s ago (models stay loaded that long before they can be "
            f"evicted); retry in {wait:.0f}s",
            retry_after=wait,
        )

    async def load(self, name: str) -> ModelHandle:
        """Load ``name`` (or wait for the load under way); return its handle once ready."""
        handle = self.get(name)
        if handle.state is S.READY:
            return handle
        if handle.state is S.DRAINING:
            raise LifecycleError(f"model {name!r} is draining; load it again once it is unloaded")
        if handle.state is S.SLEEPING:
            await asyncio.shield(self._ensure_waking(handle, "load requested while asleep"))
            return handle
        await asyncio.shield(self._ensure_loading(handle, "load requested"))
        return handle

    # -- sleep mode (GPU only) -------------------------------------------------------------

    async def sleep(self, name: str, level: int = 1) -> ModelHandle:
        """Put a ready model to sleep with vLLM's sleep mode: GPU memory freed, engine kept.

        Level 1 keeps the weights in CPU memory (fast wake), level 2 drops them. New requests
        are refused from the start; those in flight get ``drain_seconds`` to finish.
        """
        handle = self.get(name)
        if self.inventory.kind is not DeviceKind.GPU:
            raise NotSupportedError(
                "sleep mode needs a GPU (vLLM's sleep mode is CUDA-only); this appliance runs "
                f"on {self.inventory.kind.value}: use `appliance models unload {name}` instead"
            )
        if level not in (1, 2):
            raise LifecycleError(f"sleep level must be 1 or 2, not {level}")
        if not handle.spec.engine.get("enable_sleep_mode"):
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
        engine, allocation = handle.engine, handle.allocation
        assert allocation is not None, "a ready model holds its allocation"
        host_gib = self._host_gib_for_sleep(handle, engine, level)
        handle.lifecycle.swap(S.READY, S.SLEEPING, f"sleep level {level} requested")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(handle.idle.wait(), self.limits.drain_seconds)
        try:
            async with self.capacity.locks.hold(allocation.devices, DeviceChange.SLEEP):
                await engine.sleep(level)
        except Exception as exc:
            handle.last_error = f"sleep failed: {exc}"
            handle.lifecycle.swap(S.SLEEPING, S.FAILED, handle.last_error)
            self._background(self._restart(handle))
            raise
        # Asleep, the engine holds only its CUDA context on the GPUs: the rest is free for
        # others, and the weights (level 1) count against the host's budget.
        handle.allocation = allocation.sleeping()
        handle.sleep_level = level
        handle.host_gib = host_gib
        return handle

    def _host_gib_for_sleep(self, handle: ModelHandle, engine: Engine, level: int) -> float:
        """Host memory a sleep at ``level`` would fill; refuse when the budget lacks it."""
        if level != 1:
            return 0.0  # level 2 discards the weights
        assert handle.allocation is not None
        weights = engine.weights_gib()
        need = weights if weights is not None else handle.allocation.memory_gib
        used = sum(h.host_gib for h in self._models.values() if h.state is S.SLEEPING)
        self.capacity.check_host_room(handle.name, need, used)
        return need

    async def wake(self, name: str) -> ModelHandle:
        """Wake a sleeping model (or wait for the wake under way)."""
        handle = self.get(name)
        if handle.state is S.READY:
            return handle
        if handle.state not in (S.SLEEPING, S.LOADING):
            raise LifecycleError(f"model {name!r} is {handle.state.value}, not asleep")
        if handle.state is S.SLEEPING:
            await asyncio.shield(self._ensure_waking(handle, "wake requested"))
        elif handle.load_task is not None:
            await asyncio.shield(handle.load_task)
        return handle

    def _ensure_waking(self, handle: ModelHandle, reason: str) -> asyncio.Task[None]:
        if handle.load_task is None or handle.load_task.done():
            handle.load_task = asyncio.create_task(
                self._wake(handle, reason), name=f"wake-{handle.name}"
            )
        return handle.load_task

    async def _wake(self, handle: ModelHandle, reason: str) -> None:
        engine, asleep = handle.engine, handle.allocation
        assert engine is not None and asleep is not None, "a sleeping model keeps its engine"
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
            self._plan(handle, demand)
        except (PlacementError, EvictionTooSoonError) as exc:
            handle.last_error = f"cannot wake: {exc.message}"
            raise
        handle.lifecycle.swap(S.SLEEPING, S.LOADING, reason)
        started = time.monotonic()
        try:
            await self._make_room(handle, demand)
            async with self.capacity.locks.hold(asleep.devices, DeviceChange.WAKE):
                self.capacity.check_free(handle.allocation)
                await engine.wake_up()
        except Exception as exc:
            handle.last_error = f"wake failed: {exc}"
            handle.lifecycle.swap(S.LOADING, S.FAILED, handle.last_error)
            self._background(self._restart(handle))
            raise
        handle.sleep_level = 0
        handle.host_gib = 0.0
        handle.last_used = handle.ready_since = time.monotonic()
        handle.lifecycle.swap(S.LOADING, S.READY, f"awake in {time.monotonic() - started:.1f}s")

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, name: str, *, reason: str = "unload requested") -> ModelHandle:
        """Drain ``name`` (bounded), then shut its engine down and free its devices."""
        handle = self.get(name)
        if handle.state is S.LOADING and handle.load_task is not None:
            # Let the load finish (or fail) so its engine is not left behind half-built.
            with contextlib.suppress(Exception):
                await asyncio.shield(handle.load_task)
        if handle.state in (S.UNLOADED, S.DRAINING):
            if handle.state is S.DRAINING:
                await handle.lifecycle.wait_for((S.UNLOADED, S.FAILED), self.limits.drain_seconds)
            return handle
        if handle.state is S.FAILED:
            await self._release(handle)
            handle.lifecycle.swap(S.FAILED, S.UNLOADED, reason)
            return handle
        handle.lifecycle.swap((S.READY, S.SLEEPING), S.DRAINING, reason)
        try:
            await asyncio.wait_for(handle.idle.wait(), self.limits.drain_seconds)
        except asyncio.TimeoutError:
            log.warning(
                "model %s: %d request(s) still running after %.0fs of draining; stopping anyway",
                name,
                handle.in_flight,
                self.limits.drain_seconds,
                extra={"model": name, "event": "drain_timeout"},
            )
        await self._release(handle)
        handle.lifecycle.swap(S.DRAINING, S.UNLOADED, reason)
        return handle

    async def _release(self, handle: ModelHandle) -> None:
        engine, handle.engine = handle.engine, None
        allocation, handle.allocation = handle.allocation, None
        handle.sleep_level = 0
        handle.host_gib = 0.0
        if engine is not None:
            devices = allocation.devices if allocation is not None else ()
            try:
                async with self.capacity.locks.hold(devices, DeviceChange.STOP):
                    await engine.stop()
            except Exception as exc:  # a dead engine may fail to stop cleanly; it is gone anyway
                log.warning("model %s: engine stop raised %r", handle.name, exc)

    # -- requests --------------------------------------------------------------------------

    def _not_ready(self, handle: ModelHandle) -> ApplianceError:
        retry = self.limits.retry_after_seconds
        name = handle.name
        state = handle.state
        if state is S.LOADING:
            return ModelLoadingError(f"model {name!r} is still loading", retry_after=retry)
        if state is S.DRAINING:
            return ModelDrainingError(f"model {name!r} is being unloaded", retry_after=retry)
        if state is S.FAILED:
            return ModelFailedError(
                f"model {name!r} failed: {handle.last_error or 'engine error'}", retry_after=retry
            )
        if state is S.SLEEPING:
            return ModelNotReadyError(f"model {name!r} is asleep; wake it first", retry_after=retry)
        return ModelUnloadedError(
            f"model {name!r} is not loaded; load it with `appliance models load {name}`",
            retry_after=retry,
        )

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Lend ``name``'s engine to one request; wait (bounded) while it loads.

        The model counts the request as in flight until the context exits, which for a stream
        is when the stream ends; unloading waits for that.
        """
        handle = self.get(name)
        limit = handle.spec.max_queue or self.limits.max_queue
        if handle.in_flight + handle.waiting >= limit:
            raise RateLimitedError(
                f"model {name!r} has {limit} requests in flight or waiting, its limit; "
                "retry shortly",
                retry_after=1,
            )
        load: asyncio.Task[None] | None = None
        if handle.state is S.UNLOADED and handle.spec.load_on_demand:
            load = self._ensure_loading(handle, "load on demand")
        elif handle.state is S.SLEEPING and handle.spec.load_on_demand:
            load = self._ensure_waking(handle, "wake on demand")
        elif handle.state is S.LOADING:
            load = handle.load_task
        if load is not None:
            handle.waiting += 1
            try:
                # asyncio.wait neither raises the load's error nor cancels the load on timeout.
                await asyncio.wait({load}, timeout=self.limits.load_wait_seconds)
            finally:
                handle.waiting -= 1
            if load.done() and not load.cancelled():
                refused = load.exception()
                if isinstance(refused, EvictionTooSoonError):
                    raise refused  # says when to retry, where "not loaded" would not
        engine = handle.engine
        if handle.state is not S.READY or engine is None:
            raise self._not_ready(handle)
        if not engine.is_alive():
            self._mark_failed(handle, "engine died")
            raise self._not_ready(handle)
        handle.in_flight += 1
        handle.idle.clear()
        handle.last_used = time.monotonic()
        try:
            yield engine
        finally:
            handle.in_flight -= 1
            handle.last_used = time.monotonic()
            if handle.in_flight == 0:
                handle.idle.set()

    # -- supervision -----------------------------------------------------------------------

    def _mark_failed(self, handle: ModelHandle, reason: str) -> None:
        if handle.state is not S.READY:
            return
        handle.last_error = reason
        handle.lifecycle.swap(S.READY, S.FAILED, reason)
        self._background(self._restart(handle))

    def _background(self, work: Any) -> None:
        """Run ``work`` as a task the supervisor keeps (and cancels at shutdown)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, handle: ModelHandle) -> None:
        await self._release(handle)
        while not self._closing and handle.state is S.FAILED:
            if handle.failures >= self.limits.restart_max_tries:
                log.error(
                    "model %s: giving up after %d restart(s); load it by hand once fixed",
                    handle.name,
                    handle.failures,
                    extra={"model": handle.name, "event": "restart_gave_up"},
                )
                return
            delay = self.limits.restart_backoff_seconds * (2**handle.failures)
            handle.failures += 1
            log.warning(
                "model %s: restarting in %.1fs (try %d of %d)",
                handle.name,
                delay,
                handle.failures,
                self.limits.restart_max_tries,
                extra={"model": handle.name, "event": "restart"},
            )
            await asyncio.sleep(delay)
            if self._closing or handle.state is not S.FAILED:
                return
            if self._observer is not None:
                self._observer.on_restart(handle.name)
            failures = handle.failures
            with contextlib.suppress(Exception):
                await self._ensure_loading(handle, f"restart {failures} after failure")
            if handle.state is S.READY:
                return
            handle.failures = failures

    async def _watch(self) -> None:
        """Find dead engines and idle models, every ``watch_interval_seconds``."""
        while True:
            await asyncio.sleep(self.limits.watch_interval_seconds)
            now = time.monotonic()
            for handle in list(self._models.values()):
                if handle.state is not S.READY or handle.engine is None:
                    continue
                if not handle.engine.is_alive():
                    self._mark_failed(handle, "engine died")
                    continue
                keep_alive = handle.spec.keep_alive
                idle = handle.in_flight == 0 and now - handle.last_used > (keep_alive or 0)
                if keep_alive is not None and idle:
                    self._background(self.unload(handle.name, reason=f"idle for {keep_alive:.0f}s"))

    # -- reporting and shutdown ------------------------------------------------------------

    def status(self, handle: ModelHandle) -> dict[str, Any]:
        """What ``GET /admin/models`` shows of one model."""
        allocation = handle.allocation
        stats = handle.engine.stats() if handle.engine is not None else None
        return {
            "state": handle.state.value,
            "since_seconds": round(time.monotonic() - handle.lifecycle.since, 3),
            "device_kind": self.inventory.kind.value,
            "devices": list(allocation.devices) if allocation else [],
            "memory_gib": allocation.memory_gib if allocation else None,
            "memory_share": round(allocation.memory_share, 4) if allocation else None,
            "sleep_level": handle.sleep_level or None,
            "host_memory_gib": round(handle.host_gib, 3) if handle.host_gib else None,
            "load_seconds": round(handle.load_seconds, 3) if handle.load_seconds else None,
            "in_flight": handle.in_flight,
            "engine_running": stats.running if stats else 0,
            "engine_waiting": stats.waiting if stats else 0,
            "last_error": handle.last_error,
            "restarts": handle.failures,
        }

    def all_ready(self, names: Callable[[ModelHandle], bool] | None = None) -> bool:
        """True when every autoload model (or every model ``names`` selects) is ready."""
        pick = names or (lambda h: h.spec.autoload)
        return all(h.state is S.READY for h in self._models.values() if pick(h))

    async def shutdown(self) -> None:
        """Stop watching, let in-flight requests finish (bounded), stop every engine."""
        self._closing = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        for task in list(self._tasks):
            task.cancel()
        for handle in self._models.values():
            if handle.load_task is not None and not handle.load_task.done():
                handle.load_task.cancel()
                with contextlib.suppress(BaseException):
                    await handle.load_task
        await asyncio.gather(
            *(
                self.unload(h.name, reason="appliance shutting down")
                for h in self._models.values()
                if h.state is not S.UNLOADED
            ),
            return_exceptions=True,
        )
