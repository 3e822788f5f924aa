"""The supervisor: the one table of servable names and their owner.

It holds every catalogue entry, local model or remote backend, as a ``ModelHandle`` and lends
each to requests the same way (``acquire``: the per-model queue limit, in-flight counts,
states, metrics). For local models it also places them on devices, loads and unloads them
(draining first), watches engines and restarts the ones that die, unloads idle models with a
``keep_alive``; it follows remote backends' health as their state; and it applies a changed
catalogue without touching what did not change. Every state change goes through
``Lifecycle.swap`` and is logged and reported to the observer.

What the HTTP side uses of it is kept narrow and plain data, so the owner can later live in
another process than the HTTP workers: resolve a name (``target_of``, ``model_named``),
borrow and give back (``acquire``), read status (``describe``, ``state_of``,
``adapters_of``) and ask for lifecycle changes (``load``, ``unload``, ``sleep``, ``wake``,
``load_adapter``, ``unload_adapter``), all by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from appliance.catalogue.schema import LocalModelSpec, ModelSpec, RemoteModelSpec
from appliance.engines.base import Engine, EngineStats
from appliance.errors import (
    ApplianceError,
    BackendUnavailableError,
    EvictionTooSoonError,
    InsufficientResourcesError,
    LifecycleError,
    ModelDownloadingError,
    ModelDrainingError,
    ModelFailedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelUnloadedError,
    NotSupportedError,
    RateLimitedError,
)
from appliance.host.capacity import HostCapacity
from appliance.host.device_locks import DeviceChange
from appliance.host.downloads import DownloadProgress, WeightsFetcher
from appliance.host.inventory import DeviceKind, Inventory
from appliance.host.placement import Allocation, Demand, PlacementError
from appliance.host.residency import LoadPlan, Sleeper
from appliance.supervisor.handle import (
    EngineMaker,
    ModelHandle,
    RemoteEngines,
    SupervisorLimits,
    SupervisorObserver,
)
from appliance.supervisor.lending_board import ENTRY_SLOTS, LendingBoard
from appliance.supervisor.states import Lifecycle, ModelState, Transition

log = logging.getLogger("appliance.supervisor")

S = ModelState


@dataclass(frozen=True)
class Target:
    """Where a requested name goes (plain data: it may cross a process boundary later)."""

    entry: str  # the catalogue entry whose engine serves it
    served_as: str  # the model name the engine is asked for (an adapter keeps its own)
    names: tuple[str, ...]  # the names a key may list to be allowed it


def _same_but_aliases(old: ModelSpec, new: ModelSpec) -> bool:
    """Whether two entries differ in their aliases at most."""
    return type(old) is type(new) and old.model_copy(update={"aliases": []}) == new.model_copy(
        update={"aliases": []}
    )


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
        # Every HTTP process admits requests by the same counters (see lending_board).
        self.board = LendingBoard.private()
        self._free_slots = list(range(ENTRY_SLOTS - 1, -1, -1))
        self.capacity = capacity or HostCapacity(
            inventory,
            default_share=self.limits.default_memory_share,
            cpu_default_gib=self.limits.cpu_default_model_gib,
        )
        self._engines = engines
        self._remotes = remotes
        self._observer = observer
        self._fetcher = fetcher
        self._models: dict[str, ModelHandle] = {}
        self._aliases: dict[str, str] = {}  # alias -> the name of the entry it stands for
        self._adapters: dict[str, str] = {}  # LoRA adapter -> the model whose engine has it
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._autoload: asyncio.Future[list[Any]] | None = None

    # -- catalogue -------------------------------------------------------------------------

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
        if self._observer is not None:
            self._observer.on_transition(transition)

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

    def _worker_use(self, handle: ModelHandle) -> tuple[int, float]:
        """Requests HTTP workers admitted by themselves and have in flight on ``handle``, and
        when they last used it (its own ``last_used`` when later)."""
        if handle.slot is None:
            return 0, handle.last_used
        board = self.board
        return board.in_workers(handle.slot), max(handle.last_used, board.last_used(handle.slot))

    def in_flight(self, handle: ModelHandle) -> int:
        """Requests in flight on ``handle`` in every HTTP process."""
        return handle.in_flight + self._worker_use(handle)[0]

    async def _drained(self, handle: ModelHandle, timeout: float) -> None:
        """Wait (at most ``timeout``) until no request is in flight on ``handle`` here or in
        an HTTP worker (whose requests end unseen: their count is polled)."""
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(handle.idle.wait(), timeout)
        while self._worker_use(handle)[0] > 0:
            if time.monotonic() >= deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(0.02)

    def handles(self) -> list[ModelHandle]:
        """Every entry, local and remote, in catalogue order."""
        return list(self._models.values())

    def _index_aliases(self) -> None:
        """Rebuild alias -> name and adapter -> model; a name, then an earlier alias or
        adapter, wins a clash (registry input; models.yaml refuses clashes at start)."""
        aliases: dict[str, str] = {}
        adapters: dict[str, str] = {}
        for kind, names, index in (
            ("alias", lambda h: h.spec.aliases, aliases),
            ("adapter", lambda h: list(h.adapters), adapters),
        ):
            for handle in self._models.values():
                for extra in names(handle):
                    if extra in self._models or extra in aliases or extra in adapters:
                        log.error(
                            "model %s: %s %r is taken by another entry; ignored",
                            handle.name,
                            kind,
                            extra,
                            extra={"model": handle.name, "event": "name_clash"},
                        )
                        continue
                    index[extra] = handle.name
        self._aliases = aliases
        self._adapters = adapters
        self.board.table_changed()

    def target_of(self, name: str) -> Target | None:
        """What a request naming ``name`` gets: the entry whose engine serves it, the name
        that engine is asked for, and every name a key may list to use it; None if unknown."""
        if name in self._models:
            return Target(name, name, tuple(self.names_of(name)))
        if name in self._aliases:
            entry = self._aliases[name]
            return Target(entry, entry, tuple(self.names_of(name)))
        if name in self._adapters:
            # An adapter is a model of its own to clients: vLLM answers under its name.
            return Target(self._adapters[name], name, (name,))
        return None

    def resolve(self, name: str) -> str:
        """The entry serving ``name`` (a name, alias or adapter); 404 if there is none."""
        target = self.target_of(name)
        if target is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist in this appliance's catalogue", param="model"
            )
        return target.entry

    def model_named(self, name: str) -> str:
        """The entry named ``name`` or aliased so (an adapter is not a model to operate on);
        404 if there is none."""
        if name in self._models:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ModelNotFoundError(
            f"The model {name!r} does not exist in this appliance's catalogue", param="model"
        )

    def names_of(self, name: str) -> list[str]:
        """Every name of the entry ``name`` stands for, its own first; [] if there is none."""
        entry = name if name in self._models else self._aliases.get(name)
        if entry is None:
            return []
        return [entry, *(a for a, e in self._aliases.items() if e == entry)]

    def adapter_names(self) -> list[str]:
        """Every LoRA adapter name in the table."""
        return list(self._adapters)

    def get(self, name: str) -> ModelHandle:
        """The handle of ``name``; ``ModelNotFoundError`` (404) if there is none."""
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist in this appliance's catalogue", param="model"
            )
        return handle

    def _get_local(self, name: str) -> tuple[ModelHandle, LocalModelSpec]:
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
        self._index_aliases()
        self._watch_task = asyncio.create_task(self._watch(), name="supervisor-watch")
        loads = [
            self._ensure_loading(handle, "autoload at start")
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
                    await self._ensure_loading(self._models[name], "reloaded after a change")
                return
            was_serving = self._models[name].state in (S.READY, S.LOADING, S.SLEEPING)
            await self.unload(name, reason="changed in the catalogue")
            self._models[name] = self._new_handle(wanted[name])
            if was_serving or self._models[name].autoload:
                await self._ensure_loading(self._models[name], "reloaded after a change")

        async def add(name: str) -> None:
            self._models[name] = self._new_handle(wanted[name])
            if self._models[name].autoload:
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
        self._reclaim_slots()
        self._index_aliases()
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
        spec = handle.local
        assert spec is not None, "only local models load"
        fetcher = self._fetcher
        downloading = fetcher is not None and fetcher.missing(spec)
        first = S.DOWNLOADING if downloading else S.LOADING
        handle.lifecycle.swap((S.UNLOADED, S.FAILED), first, reason)
        started = time.monotonic()
        try:
            if fetcher is not None and downloading:
                # Before placement: a long download holds no device and evicts nobody.
                handle.download = DownloadProgress()
                await fetcher.fetch(spec, handle.download)
                handle.lifecycle.swap(S.DOWNLOADING, S.LOADING, "files downloaded")
            allocation = await self._make_room(handle, self.capacity.demand(spec))
            engine = self._engines.create(spec, allocation, self.inventory)
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
            handle.lifecycle.swap((S.DOWNLOADING, S.LOADING), target, handle.last_error)
            raise
        # Adapters loaded at run time (declared ones came with the engine's arguments).
        declared = set(spec.adapter_names())
        for name, source in list(handle.adapters.items()):
            if name not in declared:
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
        if self._observer is not None:
            self._observer.on_load(handle.name, handle.load_seconds)

    async def _make_room(self, handle: ModelHandle, demand: Demand) -> Allocation:
        """Place ``demand`` for ``handle``, sleeping or evicting what must go; reserve it on the
        handle. Sleeping comes first (a wake is about a second, a reload tens of seconds);
        evictable models are unloaded only when sleeping cannot make the room.

        The reservation is made before the slow start, so concurrent loads see it taken.
        """
        asleep = self._plan_sleep(handle, demand)
        if asleep is not None:
            allocation, sleepers = asleep
            handle.allocation = allocation
            handle.evicted = []
            for name in sleepers:
                log.info("putting %s to sleep to make room for %s", name, handle.name)
                await self.sleep(name, level=1)
            return allocation
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
            if h.local is not None
            and h.local.evictable
            and h.state in (S.READY, S.SLEEPING)
            and h.name != handle.name
        ]
        allocations = self._allocations(handle.name)
        settled = {
            h.name: self._worker_use(h)[1] for h in candidates if now - h.ready_since >= minimum
        }
        try:
            return self.capacity.plan(demand, allocations, settled)
        except PlacementError:
            if len(settled) == len(candidates):
                raise
            # Raises PlacementError again when even evicting the young ones would not help.
            _, victims = self.capacity.plan(
                demand, allocations, {h.name: self._worker_use(h)[1] for h in candidates}
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

    def _plan_sleep(
        self, handle: ModelHandle, demand: Demand
    ) -> tuple[Allocation, list[str]] | None:
        """Room for ``demand`` by sleeping ready evictable models with sleep mode (GPU only),
        within the host's sleep budget; None when that cannot make it. Changes nothing."""
        if self.inventory.kind is not DeviceKind.GPU:
            return None
        now = time.monotonic()
        sleepers = [
            Sleeper(
                name=h.name,
                host_gib=self._weights_gib(h),
                wake_seconds=h.wake_seconds,
                last_used=self._worker_use(h)[1],
            )
            for h in self._models.values()
            if h.local is not None
            and h.local.evictable
            and h.local.engine.get("enable_sleep_mode")
            and h.state is S.READY
            and h.engine is not None
            and h.name != handle.name
            and now - h.ready_since >= self.limits.min_resident_seconds
        ]
        if not sleepers:
            return None
        used = sum(h.host_gib for h in self._models.values() if h.state is S.SLEEPING)
        return self.capacity.plan_sleep(demand, self._allocations(handle.name), sleepers, used)

    @staticmethod
    def _weights_gib(handle: ModelHandle) -> float:
        """What a level-1 sleep of ``handle`` puts in host RAM: its weights, else its share."""
        weights = handle.engine.weights_gib() if handle.engine is not None else None
        if weights is not None:
            return weights
        return handle.allocation.memory_gib if handle.allocation is not None else 0.0

    def plan_load(self, name: str) -> LoadPlan:
        """Where ``name`` would go if loaded now, which models would sleep and which would be
        evicted for it: a dry run (`appliance models plan`) that changes nothing. A model that
        holds devices already (loading, ready, sleeping, draining) answers with its own
        allocation."""
        handle, spec = self._get_local(name)
        if handle.allocation is not None:
            return LoadPlan(handle.allocation, sleep=[], evict=[])
        demand = self.capacity.demand(spec)
        asleep = self._plan_sleep(handle, demand)
        if asleep is not None:
            return LoadPlan(asleep[0], sleep=asleep[1], evict=[])
        allocation, evicted = self._plan(handle, demand)
        return LoadPlan(allocation, sleep=[], evict=evicted)

    async def load(self, name: str) -> ModelHandle:
        """Load ``name`` (or wait for the load under way); return its handle once ready."""
        handle, _ = self._get_local(name)
        if handle.state is S.READY:
            return handle
        if handle.state is S.DRAINING:
            raise LifecycleError(f"model {name!r} is draining; load it again once it is unloaded")
        if handle.state is S.SLEEPING:
            await asyncio.shield(self._ensure_waking(handle, "load requested while asleep"))
            return handle
        await asyncio.shield(self._ensure_loading(handle, "load requested"))
        return handle

    # -- LoRA adapters ---------------------------------------------------------------------

    async def load_adapter(self, model: str, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` as ``name`` on ``model``'s running engine;
        requests in flight on the model go on. 409 if the model is not ready or the name is
        taken; 400 if the source cannot be loaded."""
        handle, spec = self._get_local(model)
        if self.target_of(name) is not None and self._adapters.get(name) != model:
            raise LifecycleError(f"{name!r} is already a model, alias or adapter name")
        if handle.state is not S.READY or handle.engine is None:
            raise LifecycleError(
                f"model {model!r} is {handle.state.value}; adapters load on a ready model"
            )
        path = self._engines.adapter_source(spec.name, name, source)
        await handle.engine.load_adapter(name, path)
        handle.adapters[name] = source
        self._index_aliases()
        log.info(
            "model %s: adapter %s loaded from %s",
            model,
            name,
            source,
            extra={"model": model, "event": "adapter_loaded", "adapter": name},
        )

    async def unload_adapter(self, model: str, name: str) -> None:
        """Stop serving adapter ``name`` of ``model`` (404 if it has none of that name)."""
        handle, _ = self._get_local(model)
        if name not in handle.adapters:
            raise ModelNotFoundError(f"model {model!r} has no adapter {name!r}", param="name")
        if handle.engine is not None and handle.state is S.READY:
            await handle.engine.unload_adapter(name)
        del handle.adapters[name]
        self._index_aliases()
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

    # -- sleep mode (GPU only) -------------------------------------------------------------

    async def sleep(self, name: str, level: int = 1) -> ModelHandle:
        """Put a ready model to sleep with vLLM's sleep mode: GPU memory freed, engine kept.

        Level 1 keeps the weights in CPU memory (fast wake), level 2 drops them. New requests
        are refused from the start; those in flight get ``drain_seconds`` to finish.
        """
        handle, spec = self._get_local(name)
        if self.inventory.kind is not DeviceKind.GPU:
            raise NotSupportedError(
                "sleep mode needs a GPU (vLLM's sleep mode is CUDA-only); this appliance runs "
                f"on {self.inventory.kind.value}: use `appliance models unload {name}` instead"
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
        engine, allocation = handle.engine, handle.allocation
        assert allocation is not None, "a ready model holds its allocation"
        host_gib = self._host_gib_for_sleep(handle, engine, level)
        handle.lifecycle.swap(S.READY, S.SLEEPING, f"sleep level {level} requested")
        with contextlib.suppress(asyncio.TimeoutError):
            await self._drained(handle, self.limits.drain_seconds)
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
        handle, _ = self._get_local(name)
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
        handle.wake_seconds = handle.last_used - started
        handle.lifecycle.swap(S.LOADING, S.READY, f"awake in {handle.wake_seconds:.1f}s")

    # -- unloading -------------------------------------------------------------------------

    async def unload(self, name: str, *, reason: str = "unload requested") -> ModelHandle:
        """Drain ``name`` (bounded), then shut its engine down and free its devices."""
        handle, _ = self._get_local(name)
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
                await handle.lifecycle.wait_for((S.UNLOADED, S.FAILED), self.limits.drain_seconds)
            return handle
        if handle.state is S.FAILED:
            await self._release(handle)
            handle.lifecycle.swap(S.FAILED, S.UNLOADED, reason)
            return handle
        handle.lifecycle.swap((S.READY, S.SLEEPING), S.DRAINING, reason)
        try:
            await self._drained(handle, self.limits.drain_seconds)
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
        if state is S.DOWNLOADING and handle.download is not None:
            progress = handle.download
            return ModelDownloadingError(
                f"model {name!r} is downloading its files ({progress.done_bytes} of "
                f"{progress.total_bytes} bytes); it loads next",
                retry_after=round(progress.retry_after(retry)),
            )
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
        """Lend ``name``'s engine to one request; wait (bounded) while a local model loads.

        The same for every kind of entry: beyond the model's queue limit a 429, and the
        request counts as in flight until the context exits (for a stream, when the stream
        ends); unloading waits for that.
        """
        handle = self.get(name)
        limit = self.queue_limit(handle)
        # In flight or waiting, in this process and (on the board) in every HTTP worker.
        slot = handle.slot
        if not (
            self.board.reserve(slot, limit)
            if slot is not None
            else handle.in_flight + handle.waiting < limit
        ):
            raise RateLimitedError(
                f"model {name!r} has {limit} requests in flight or waiting, its limit; "
                "retry shortly",
                retry_after=1,
            )
        try:
            if handle.local is None:
                engine = self._remote_engine(handle)
            else:
                engine = await self._local_engine(handle, handle.local)
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
        finally:
            if slot is not None:
                self.board.unreserve(slot)

    def queue_limit(self, handle: ModelHandle) -> int:
        """Requests ``handle`` may have in flight or waiting, in every HTTP process."""
        return handle.spec.max_queue or self.limits.max_queue

    async def _local_engine(self, handle: ModelHandle, spec: LocalModelSpec) -> Engine:
        """The ready engine of a local model, after waiting (bounded) for a load or wake."""
        load: asyncio.Task[None] | None = None
        if handle.state is S.UNLOADED and spec.load_on_demand:
            load = self._ensure_loading(handle, "load on demand")
        elif handle.state is S.SLEEPING and spec.load_on_demand:
            load = self._ensure_waking(handle, "wake on demand")
        elif handle.state in (S.LOADING, S.DOWNLOADING):
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
        return engine

    def _remote_engine(self, handle: ModelHandle) -> Engine:
        """The proxy of a remote entry. It is lent even while unavailable: its circuit breaker
        answers 503 with Retry-After at once, and lets the probe through that closes it."""
        if self._remotes is None or not isinstance(handle.spec, RemoteModelSpec):
            raise BackendUnavailableError(f"model {handle.name!r}: remote backends are not enabled")
        handle.engine = self._remotes.get(handle.spec)
        self._follow_remote(handle)
        return handle.engine

    def _follow_remote(self, handle: ModelHandle) -> None:
        """Turn a remote entry's backend health into its state: ready or unavailable."""
        if handle.local is not None or handle.engine is None:
            return
        up = handle.engine.is_alive()
        if up and handle.state is S.UNAVAILABLE:
            handle.lifecycle.swap(S.UNAVAILABLE, S.READY, "the backend answers again")
        elif not up and handle.state is S.READY:
            handle.lifecycle.swap(S.READY, S.UNAVAILABLE, "the backend stopped answering")

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
                if handle.local is None:
                    self._refresh_remote(handle)
                    continue
                if handle.state is not S.READY or handle.engine is None:
                    continue
                if not handle.engine.is_alive():
                    self._mark_failed(handle, "engine died")
                    continue
                keep_alive = handle.keep_alive()
                in_workers, last_used = self._worker_use(handle)
                idle = handle.in_flight + in_workers == 0 and now - last_used > (keep_alive or 0)
                if keep_alive is not None and idle:
                    self._background(self._expire(handle, keep_alive))

    async def _expire(self, handle: ModelHandle, keep_alive: float) -> None:
        """keep_alive ran out: sleep at level 1 where the engine can and the host's sleep budget
        has room for its weights (a wake takes about a second, a reload tens of seconds), and
        unload only otherwise. On CPU (no sleep mode) that is always an unload."""
        reason = f"idle for {keep_alive:.0f}s"
        can_sleep = (
            self.inventory.kind is DeviceKind.GPU
            and handle.local is not None
            and bool(handle.local.engine.get("enable_sleep_mode"))
        )
        if can_sleep and handle.state is S.READY:
            try:
                await self.sleep(handle.name, level=1)
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
            await self.unload(handle.name, reason=reason)

    def _refresh_remote(self, handle: ModelHandle) -> None:
        """Follow a remote entry's backend even while no request comes (health checks)."""
        if self._remotes is not None and isinstance(handle.spec, RemoteModelSpec):
            handle.engine = self._remotes.get(handle.spec)
            self._follow_remote(handle)

    # -- reporting and shutdown ------------------------------------------------------------

    def state_of(self, name: str) -> ModelState:
        """The current state of ``name`` (404 if there is none)."""
        handle = self.get(name)
        if handle.local is None:
            self._refresh_remote(handle)
        return handle.state

    def describe(self, name: str) -> dict[str, Any]:
        """Everything known about ``name``, as plain JSON data: the one presenter of a model's
        status (the admin API, ``appliance models list|ps`` and the status page read it)."""
        handle = self.get(name)
        spec = handle.spec
        entry: dict[str, Any] = {
            "name": spec.name,
            "kind": "local" if handle.local is not None else "remote",
            "version": spec.version,
            "owner": spec.owner,
            "task": spec.task.value,
            "aliases": [a for a, e in self._aliases.items() if e == name],
            "adapters": [{"name": a, "source": s} for a, s in handle.adapters.items()],
            "max_queue": spec.max_queue or self.limits.max_queue,
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
            self._refresh_remote(handle)
            entry["backend_url"] = spec.backend_url
            entry["backend_model"] = spec.upstream_name
        entry.update(self.status(handle))
        if isinstance(spec, RemoteModelSpec) and self._remotes is not None:
            # The backend's own health: up, its breaker, why it last failed.
            entry.update(self._remotes.health(spec))
        # Per device, in the order of "devices": what the status page draws its bars from.
        entry["reserved_gib"] = list(handle.allocation.reserved_gib) if handle.allocation else []
        return entry

    def engine_stats(self, handle: ModelHandle) -> EngineStats | None:
        """The load of ``handle``'s engine (None without one): its own figures, with the
        requests HTTP workers have in flight on it counted as running."""
        if handle.engine is None:
            return None
        stats = handle.engine.stats()
        peers = self.peer_running(handle.name) + self._worker_use(handle)[0]
        return dataclasses.replace(stats, running=stats.running + peers) if peers else stats

    def status(self, handle: ModelHandle) -> dict[str, Any]:
        """The state and load of one model (part of :meth:`describe`)."""
        allocation = handle.allocation
        stats = self.engine_stats(handle)
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
            "wake_seconds": round(handle.wake_seconds, 3) if handle.wake_seconds else None,
            "in_flight": self.in_flight(handle),
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

    def all_ready(self, names: Callable[[ModelHandle], bool] | None = None) -> bool:
        """True when every autoload model (or every model ``names`` selects) is ready."""
        pick = names or (lambda h: h.autoload)
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
                if h.local is not None and h.state is not S.UNLOADED
            ),
            return_exceptions=True,
        )
