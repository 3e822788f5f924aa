"""The supervisor: the one table of servable names and their owner.

It holds every catalogue entry, local model or remote backend, as a ``ModelHandle``, applies
a changed catalogue without touching what did not change, and composes the parts that work on
the table, each a small class of one responsibility:

- ``names.NameIndex``: a name, alias or adapter -> the entry serving it;
- ``room.Room``: planning only, where a model goes and what sleeps or is evicted for it;
- ``loading.Loading``: load, sleep, wake and unload a local model's engine (draining first);
- ``lending.Lending``: lending an engine to requests (``acquire``: the per-model queue limit,
  in-flight counts, the wait for a load, not-ready errors), the same for every kind of entry;
- ``supervision.Supervision``: restarting engines that die, ``keep_alive``, remote health;
- ``presenter.Presenter``: the one status JSON of a model.

Every state change goes through ``Lifecycle.swap`` and is logged and reported to the observer.

What the HTTP side uses of it is kept narrow and plain data, so the owner can later live in
another process than the HTTP workers: resolve a name (``target_of``, ``model_named``),
borrow and give back (``acquire``), read status (``describe``, ``state_of``,
``adapters_of``) and ask for lifecycle changes (``load``, ``unload``, ``sleep``, ``wake``,
``load_adapter``, ``unload_adapter``), all by name. Those stay methods of ``Supervisor``,
each delegating to the part that does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.engines.base import Engine, EngineStats, SchedulerSnapshot, TakesAdapters
from appliance.errors import (
    ApplianceError,
    LifecycleError,
    ModelNotFoundError,
    NotSupportedError,
)
from appliance.host.capacity import HostCapacity
from appliance.host.downloads import WeightsFetcher
from appliance.host.inventory import Inventory
from appliance.host.residency import LoadPlan
from appliance.host.startup_plan import StartupPlan
from appliance.supervisor.handle import (
    EngineMaker,
    ModelHandle,
    RemoteEngines,
    SupervisorLimits,
    SupervisorObserver,
)
from appliance.supervisor.lending import Lending
from appliance.supervisor.lending_board import ENTRY_SLOTS, LendingBoard
from appliance.supervisor.loading import Loading
from appliance.supervisor.names import NameIndex, Target
from appliance.supervisor.presenter import Presenter
from appliance.supervisor.room import Room
from appliance.supervisor.states import Lifecycle, ModelState, Transition
from appliance.supervisor.supervision import Supervision

__all__ = ["Supervisor", "Target"]  # Target lives in names.py; callers import it from here

log = logging.getLogger("appliance.supervisor")

S = ModelState


def _same_but_aliases(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether two entries differ in their aliases at most."""
    return type(old) is type(new) and old.model_copy(update={"aliases": []}) == new.model_copy(
        update={"aliases": []}
    )


class Supervisor:
    """Owns the model table and composes the parts that work on it; see the module docstring."""

    def __init__(
        self,
        inventory: Inventory,
        engines: EngineMaker,
        *,
        limits: SupervisorLimits | None = None,
        observer: SupervisorObserver | None = None,
        capacity: HostCapacity | None = None,
        remotes: RemoteEngines | None = None,
        fetcher: WeightsFetcher | None = None,
    ) -> None:
        """``capacity`` places engines on ``inventory`` (default: the default policy there);
        ``remotes`` proxies remote entries (without it they answer 503); ``fetcher`` downloads
        a model's missing files before it loads (None: the engine's own start fetches them,
        with no ``downloading`` state)."""
        self.inventory = inventory
        self.limits = limits or SupervisorLimits()
        # Requests other HTTP processes have in flight on a model's engine (issue 16: each
        # worker is a client of its own, whose requests this process's client does not see).
        self.peer_running: Callable[[str], int] = lambda name: 0
        # The freshest scheduler figures other HTTP processes' clients got of an engine.
        self.peer_scheduler: Callable[[Engine], SchedulerSnapshot | None] = lambda e: None
        # Every HTTP process admits requests by the same counters (see lending_board).
        self.board = LendingBoard.private()
        self._free_slots = list(range(ENTRY_SLOTS - 1, -1, -1))
        self.capacity = capacity or HostCapacity(
            inventory,
            default_share=self.limits.default_memory_share,
            cpu_default_gib=self.limits.cpu_default_model_gib,
        )
        self._engines = engines
        self.remotes = remotes  # the parts read these three
        self.observer = observer
        self.closing = False  # set once shutdown begins: nothing restarts after
        # The table. Changed in place only, never rebound: the parts hold this dict.
        self._models: dict[str, ModelHandle] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._autoload: asyncio.Future[list[Any]] | None = None
        self.startup = StartupPlan()  # where the autoload models go, in catalogue order
        self.names = NameIndex(self._models)
        self.lending = Lending(self)
        self.room = Room(
            self._models,
            self.capacity,
            inventory,
            self.limits,
            last_used=lambda handle: self.lending.worker_use(handle)[1],
        )
        self.loading = Loading(self, engines, fetcher)
        self.supervision = Supervision(self)
        self.presenter = Presenter(self)

    # -- the table -------------------------------------------------------------------------

    def _new_handle(self, spec: ModelSpec) -> ModelHandle:
        # A remote backend has nothing to load: it is ready until its breaker says otherwise.
        initial = S.UNLOADED if isinstance(spec, LocalModelSpec) else S.READY
        lifecycle = Lifecycle(spec.name, self._on_transition, initial=initial)
        handle = ModelHandle(spec=spec, lifecycle=lifecycle)
        handle.slot = self._free_slots.pop() if self._free_slots else None
        if isinstance(spec, LocalModelSpec):
            handle.adapters = {a.name: a.source for a in spec.adapters}
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
        handle = self._models.get(transition.model)
        if handle is not None and handle.slot is not None and handle.local is not None:
            # Workers lend a local model only while it is ready, with the engine it had then.
            if transition.new is S.READY:
                self.board.open(handle.slot)
            elif transition.old is S.READY:
                self.board.close(handle.slot)
        if self.observer is not None:
            self.observer.on_transition(transition)

    def _reclaim_slots(self) -> None:
        """Board slots of entries gone from the table: closed, and free again once no
        request counted on them is left (a remote entry's requests outlive its handle)."""
        used = {h.slot for h in self._models.values()}
        free = set(self._free_slots)
        for slot in range(ENTRY_SLOTS):
            if slot not in used and slot not in free:
                self.board.close(slot)
                if self.board.count(slot) == 0:
                    self._free_slots.append(slot)

    def lend_through(self, board: LendingBoard) -> None:
        """Admit requests by ``board``, shared with HTTP workers (before ``start``)."""
        self.board = board

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task the supervisor keeps (and cancels at shutdown)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def handles(self) -> list[ModelHandle]:
        """Every entry, local and remote, in catalogue order."""
        return list(self._models.values())

    def get(self, name: str) -> ModelHandle:
        """The handle of ``name``; ``ModelNotFoundError`` (404) if there is none."""
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist in this appliance's catalogue", param="model"
            )
        return handle

    def get_local(self, name: str) -> tuple[ModelHandle, LocalModelSpec]:
        """The handle of local model ``name``; ``LifecycleError`` (409) for a remote one."""
        handle = self.get(name)
        if handle.local is None:
            raise LifecycleError(
                f"model {name!r} is a remote backend: it is loaded, unloaded and put to sleep "
                "on its own server"
            )
        return handle, handle.local

    async def start(self, specs: Iterable[ModelSpec]) -> None:
        """Take the catalogue's local models, start watching, and start the autoload loads.

        Returns at once; ``wait_autoload`` waits for the loads to end.
        """
        for spec in specs:
            self._models[spec.name] = self._new_handle(spec)
        self.names.rebuild(self.board)
        self._watch_task = asyncio.create_task(self.supervision.watch(), name="supervisor-watch")
        self.startup = StartupPlan.of(self.capacity, [h.spec for h in self.handles() if h.autoload])
        loads = [
            self.loading.ensure_loading(handle, "autoload at start")
            for handle in self._models.values()
            if handle.autoload
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
        wanted = {spec.name: spec for spec in specs}
        for spec in wanted.values():
            self._engines.validate(spec)
        added = [name for name in wanted if name not in self._models]
        removed = [name for name in self._models if name not in wanted]
        for name, new in wanted.items():
            if name in self._models and _same_but_aliases(self._models[name].spec, new):
                self._models[name].spec = new  # new names for the same model: nothing restarts
        changed = [
            name
            for name in wanted
            if name in self._models and self._models[name].spec != wanted[name]
        ]

        async def remove(name: str) -> None:
            if self._models[name].local is not None:
                await self.unload(name, reason="removed from the catalogue")
            self._models.pop(name, None)

        async def replace(name: str) -> None:
            if self._models[name].local is None or not isinstance(wanted[name], LocalModelSpec):
                # A remote entry has no engine of its own: requests in flight keep theirs.
                if self._models[name].local is not None:
                    await self.unload(name, reason="changed in the catalogue")
                self._models[name] = self._new_handle(wanted[name])
                if self._models[name].autoload:
                    await self.loading.ensure_loading(self._models[name], "reloaded after a change")
                return
            was_serving = self._models[name].state in (S.READY, S.LOADING, S.SLEEPING)
            await self.unload(name, reason="changed in the catalogue")
            self._models[name] = self._new_handle(wanted[name])
            if was_serving or self._models[name].autoload:
                await self.loading.ensure_loading(self._models[name], "reloaded after a change")

        async def add(name: str) -> None:
            self._models[name] = self._new_handle(wanted[name])
            if self._models[name].autoload:
                await self.loading.ensure_loading(self._models[name], "added to the catalogue")

        # Removals first, so added models can use the memory they free.
        results = await asyncio.gather(*(remove(n) for n in removed), return_exceptions=True)
        results += await asyncio.gather(
            *(replace(n) for n in changed), *(add(n) for n in added), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ApplianceError):
                log.error("catalogue change failed: %r", result)
        # Keep catalogue order for listings.
        ordered = {n: self._models[n] for n in wanted if n in self._models}
        self._models.clear()  # in place: the parts hold this dict
        self._models.update(ordered)
        self._reclaim_slots()
        self.names.rebuild(self.board)
        return {"added": added, "removed": removed, "changed": changed}

    # -- names (names.NameIndex) -----------------------------------------------------------

    def target_of(self, name: str) -> Target | None:
        """What a request naming ``name`` gets (:meth:`NameIndex.target_of`); None if unknown."""
        return self.names.target_of(name)

    def resolve(self, name: str) -> str:
        """The entry serving ``name`` (a name, alias or adapter); 404 if there is none."""
        return self.names.resolve(name)

    def model_named(self, name: str) -> str:
        """The entry named ``name`` or aliased so (not an adapter); 404 if there is none."""
        return self.names.model_named(name)

    def names_of(self, name: str) -> list[str]:
        """Every name of the entry ``name`` stands for, its own first; [] if there is none."""
        return self.names.names_of(name)

    def adapter_names(self) -> list[str]:
        """Every LoRA adapter name in the table."""
        return self.names.adapter_names()

    # -- loading and unloading (room.Room plans, loading.Loading moves) --------------------

    def plan_load(self, name: str) -> LoadPlan:
        """Where ``name`` would go if loaded now: a dry run (:meth:`Room.plan_load`)."""
        return self.room.plan_load(*self.get_local(name))

    async def load(self, name: str) -> ModelHandle:
        """Load ``name`` (or wait for the load under way); return its handle once ready."""
        return await self.loading.load(name)

    async def sleep(self, name: str, level: int = 1) -> ModelHandle:
        """Put a ready model to sleep with vLLM's sleep mode (:meth:`Loading.sleep`)."""
        return await self.loading.sleep(name, level)

    async def wake(self, name: str) -> ModelHandle:
        """Wake a sleeping model (or wait for the wake under way)."""
        return await self.loading.wake(name)

    async def unload(self, name: str, *, reason: str = "unload requested") -> ModelHandle:
        """Drain ``name`` (bounded), then shut its engine down and free its devices."""
        return await self.loading.unload(name, reason=reason)

    # -- LoRA adapters ---------------------------------------------------------------------

    async def load_adapter(self, model: str, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` as ``name`` on ``model``'s running engine;
        requests in flight on the model go on. 409 if the model is not ready or the name is
        taken; 400 if the source cannot be loaded."""
        handle, spec = self.get_local(model)
        if self.target_of(name) is not None and self.names.adapter_model(name) != model:
            raise LifecycleError(f"{name!r} is already a model, alias or adapter name")
        if handle.state is not S.READY or handle.engine is None:
            raise LifecycleError(
                f"model {model!r} is {handle.state.value}; adapters load on a ready model"
            )
        if not isinstance(handle.engine, TakesAdapters):
            raise NotSupportedError(f"model {model!r}: its engine takes no adapters at run time")
        path = self._engines.adapter_source(spec.name, name, source)
        await handle.engine.load_adapter(name, path)
        handle.adapters[name] = source
        self.names.rebuild(self.board)
        log.info(
            "model %s: adapter %s loaded from %s",
            model,
            name,
            source,
            extra={"model": model, "event": "adapter_loaded", "adapter": name},
        )

    async def unload_adapter(self, model: str, name: str) -> None:
        """Stop serving adapter ``name`` of ``model`` (404 if it has none of that name)."""
        handle, _ = self.get_local(model)
        if name not in handle.adapters:
            raise ModelNotFoundError(f"model {model!r} has no adapter {name!r}", param="name")
        if isinstance(handle.engine, TakesAdapters) and handle.state is S.READY:
            await handle.engine.unload_adapter(name)
        del handle.adapters[name]
        self.names.rebuild(self.board)
        log.info(
            "model %s: adapter %s unloaded",
            model,
            name,
            extra={"model": model, "event": "adapter_unloaded", "adapter": name},
        )

    def adapters_of(self, model: str) -> dict[str, str]:
        """``model``'s LoRA adapters: name -> source, resolved as its engine loaded it (a
        relative folder against models.yaml's), so every client loads the same path under
        the same id; none for a remote entry."""
        handle = self.get(model)
        return {
            name: self._engines.adapter_source(handle.name, name, source)
            for name, source in handle.adapters.items()
        }

    # -- requests (lending.Lending) --------------------------------------------------------

    def acquire(self, name: str) -> contextlib.AbstractAsyncContextManager[Engine]:
        """Lend ``name``'s engine to one request, as ``async with`` (:meth:`Lending.acquire`):
        429 beyond its queue limit, a bounded wait while a local model loads."""
        return self.lending.acquire(name)

    def queue_limit(self, handle: ModelHandle) -> int:
        """Requests ``handle`` may have in flight or waiting, in every HTTP process."""
        return self.lending.queue_limit(handle)

    def in_flight(self, handle: ModelHandle) -> int:
        """Requests in flight on ``handle`` in every HTTP process."""
        return self.lending.in_flight(handle)

    # -- reporting (presenter.Presenter) and shutdown --------------------------------------

    def state_of(self, name: str) -> ModelState:
        """The current state of ``name`` (404 if there is none)."""
        handle = self.get(name)
        if handle.local is None:
            self.supervision.refresh_remote(handle)
        return handle.state

    def describe(self, name: str) -> dict[str, Any]:
        """Everything known about ``name``, as plain JSON data (:meth:`Presenter.describe`)."""
        return self.presenter.describe(name)

    def engine_stats(self, handle: ModelHandle) -> EngineStats | None:
        """The load of ``handle``'s engine, every HTTP process's requests counted as running."""
        return self.presenter.engine_stats(handle)

    def status(self, handle: ModelHandle) -> dict[str, Any]:
        """The state and load of one model (part of :meth:`describe`)."""
        return self.presenter.status(handle)

    def all_ready(self, names: Callable[[ModelHandle], bool] | None = None) -> bool:
        """True when every autoload model (or every model ``names`` selects) is ready."""
        pick = names or (lambda h: h.autoload)
        return all(h.state is S.READY for h in self._models.values() if pick(h))

    async def shutdown(self) -> None:
        """Stop watching, let in-flight requests finish (bounded), stop every engine."""
        self.closing = True
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
                if h.local is not None and h.state is not S.UNLOADED
            ),
            return_exceptions=True,
        )
