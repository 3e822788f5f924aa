"""What the supervisor holds per catalogue entry, its bounds, and the interfaces it is given.

``ModelHandle`` is one catalogue model as the supervisor keeps it; ``SupervisorLimits`` its
time bounds and defaults; ``EngineMaker`` and ``SupervisorObserver`` what it is handed to make
engines and to report lifecycle events (metrics implement the observer).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.engines.base import Engine
from appliance.host.downloads import DownloadProgress
from appliance.host.inventory import Inventory
from appliance.host.placement import Allocation
from appliance.supervisor.states import Lifecycle, ModelState, Transition


class EngineMaker(Protocol):
    """What the supervisor needs to make engines (``appliance.engines.factory.EngineFactory``)."""

    def validate(self, spec: LocalModelSpec | RemoteModelSpec) -> None:
        """Raise ``ConfigError`` if ``spec`` cannot be served."""
        ...

    def create(
        self, spec: LocalModelSpec, allocation: Allocation | None, inventory: Inventory
    ) -> Engine:
        """A new engine for ``spec`` on ``allocation`` (None: a Ray entry, placed off this
        host)."""
        ...

    def adapter_source(self, model: str, name: str, source: str) -> str:
        """Where the engine loads adapter ``name`` from (``ConfigError`` if it cannot)."""
        ...


class RemoteEngines(Protocol):
    """Where the supervisor gets remote backends' engines (``appliance.engines.remote``)."""

    def get(self, spec: RemoteModelSpec) -> Engine:
        """The engine that proxies ``spec`` to its backend (shared by every request)."""
        ...

    def health(self, spec: RemoteModelSpec) -> dict[str, Any]:
        """The backend's health as plain data: ``up``, ``breaker``, ``last_error``."""
        ...


class SupervisorObserver(Protocol):
    """Receives lifecycle events (metrics implement this)."""

    def on_transition(self, transition: Transition) -> None:
        """A model changed state."""
        ...

    def on_load(self, model: str, seconds: float) -> None:
        """A model finished loading in ``seconds``."""
        ...

    def on_restart(self, model: str) -> None:
        """The supervisor is restarting a failed engine."""
        ...

    def on_eviction(self, model: str) -> None:
        """A model was unloaded to make room for another."""
        ...


@dataclass(frozen=True)
class SupervisorLimits:
    """The supervisor's time bounds and defaults."""

    load_wait_seconds: float = 60.0  # a request waits this long for a loading model
    drain_seconds: float = 30.0  # in-flight requests get this long to finish on unload
    retry_after_seconds: int = 5  # what 503 answers tell clients
    restart_max_tries: int = 3  # consecutive failed restarts before giving up
    restart_backoff_seconds: float = 2.0  # first restart delay, doubled each try
    watch_interval_seconds: float = 0.5  # how often engines are checked for death and idleness
    default_memory_share: float = 0.9  # GPU share for a model that declares no memory
    cpu_default_model_gib: float = 2.0  # CPU memory for a model that declares no memory
    max_queue: int = 512  # requests in flight or waiting per model, unless the model says
    # A model loaded (or woken) less than this ago is not evicted for another: without it, two
    # on-demand models could evict each other in a loop and keep the devices busy loading.
    min_resident_seconds: float = 30.0
    # After a GPU engine's stop, how long its devices stay locked waiting for its processes to
    # exit and its memory to come back (vLLM alone takes 5 s before it kills a core).
    device_release_seconds: float = 60.0


@dataclass
class ModelHandle:
    """One catalogue entry as the supervisor holds it: a local model or a remote backend.

    Both kinds are lent to requests the same way (queue limit, in-flight count, state); a
    remote one starts ready, has no allocation, and its engine is the shared proxy.
    """

    spec: LocalModelSpec | RemoteModelSpec
    lifecycle: Lifecycle
    engine: Engine | None = None
    allocation: Allocation | None = None
    in_flight: int = 0
    waiting: int = 0  # requests waiting for the model to load or wake
    slot: int | None = None  # its counters on the lending board (None: past the board's size)
    last_used: float = field(default_factory=time.monotonic)
    ready_since: float = 0.0  # monotonic time of its last load or wake; eviction waits on it
    last_error: str | None = None
    load_seconds: float | None = None
    failures: int = 0
    load_task: asyncio.Task[None] | None = None
    evicted: list[str] = field(default_factory=list)  # what the last load unloaded for room
    sleep_level: int = 0  # 0 awake; 1 or 2 while asleep at that vLLM sleep level
    host_gib: float = 0.0  # host memory its weights fill while asleep at level 1
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapter name -> its source
    wake_seconds: float | None = None  # how long its last wake from sleep took
    download: DownloadProgress | None = None  # while (or since) its files were downloading
    # A request's keep_alive (Ollama's API): (the engine it was asked for, idle seconds).
    keep_alive_asked: tuple[Engine, float] | None = None

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name

    @property
    def local(self) -> LocalModelSpec | None:
        """The entry when this appliance's engines serve it; None for a remote backend."""
        return self.spec if isinstance(self.spec, LocalModelSpec) else None

    def ask_keep_alive(self, seconds: float) -> None:
        """Keep the running engine ``seconds`` once idle (``math.inf``: until unloaded), as a
        request asked; the entry's own ``keep_alive`` applies again to its next engine."""
        if self.engine is not None:
            self.keep_alive_asked = (self.engine, seconds)
            self.last_used = time.monotonic()  # the asking request is using it now

    def keep_alive(self) -> float | None:
        """Idle seconds before the running engine unloads (None: it stays): a request's
        ``keep_alive`` for this engine, else the entry's."""
        asked = self.keep_alive_asked
        if asked is not None and asked[0] is self.engine:
            return None if math.isinf(asked[1]) else asked[1]
        self.keep_alive_asked = None  # asked of an engine since stopped
        return self.local.keep_alive if self.local is not None else None

    @property
    def autoload(self) -> bool:
        """Whether the model loads at start (remote backends have nothing to load)."""
        return self.local is not None and self.local.autoload

    @property
    def state(self) -> ModelState:
        """The model's current state."""
        return self.lifecycle.state
