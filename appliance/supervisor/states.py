"""The lifecycle of one model: a state enum, the legal transitions, one guarded change.

Modelled on llama-swap's ``proxy/process.go``: every change of state goes through
``Lifecycle.swap(expected, new, reason)``, a compare-and-swap that refuses an illegal change
with a named error and reports each change it makes to one callback (where the supervisor logs
it and counts it in metrics).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from appliance.errors import LifecycleError

logger = logging.getLogger(__name__)


class ModelState(str, enum.Enum):
    """Where a model is in its life (a remote backend: ready or unavailable only)."""

    UNLOADED = "unloaded"  # no engine; holds no device memory
    DOWNLOADING = "downloading"  # its files are being fetched; no engine, no device memory yet
    LOADING = "loading"  # engine starting (or waking from sleep); requests wait, bounded
    READY = "ready"  # engine up; serving requests
    SLEEPING = "sleeping"  # engine alive but its GPU memory released (vLLM sleep mode; GPU only)
    DRAINING = "draining"  # no new requests; in-flight ones finish, then the engine stops
    FAILED = "failed"  # engine failed to start or died; requests get a clear error
    UNAVAILABLE = "unavailable"  # a remote backend that stopped answering (breaker open)


# The legal changes, from -> allowed targets. Why each edge exists:
#   unloaded -> loading    load (operator, autoload at start, or on demand)
#   unloaded -> downloading  the same load, when the model's files are not on disk yet
#   downloading -> loading   the files are there; placement and the engine start follow
#   downloading -> failed    the download failed (gated, gone, disk full, hub unreachable)
#   downloading -> unloaded  load cancelled (unload asked mid-download, shutdown)
#   loading  -> ready      the engine answered its first health check
#   loading  -> failed     the engine could not start (bad weights, out of memory, crash)
#   loading  -> unloaded   load cancelled (unload asked mid-load, shutdown); nothing to drain
#   ready    -> draining   unload, eviction or shutdown: stop taking requests, finish in-flight
#   ready    -> sleeping   sleep: release GPU memory, keep the process for a fast wake
#   ready    -> failed     the engine died while serving
#   sleeping -> loading    wake: memory is being taken back; waiters treat it like a load
#   sleeping -> draining   unload a sleeping model; the same stop path as from ready
#   sleeping -> failed     the sleeping engine died
#   draining -> unloaded   the engine stopped and its devices are free
#   draining -> failed     the engine could not be stopped cleanly (devices may still be held)
#   failed   -> loading    restart after a failure
#   failed   -> downloading  a retry after a failed download
#   failed   -> unloaded   the operator clears the failure (unload) once the engine is gone
#   ready    -> unavailable  a remote backend's circuit breaker opened (or its health check
#                            failed); remote entries start ready and only ever swap these two
#   unavailable -> ready     the remote backend answers again
# Deliberately absent: ready -> loading (reload goes through draining and unloaded, so devices
# are freed before they are placed again), ready -> unloaded and sleeping -> unloaded (a
# running engine is always stopped through draining), and any state -> itself (a no-op swap
# hides a logic error in the caller).
TRANSITIONS: Mapping[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING, ModelState.DOWNLOADING}),
    ModelState.DOWNLOADING: frozenset({ModelState.LOADING, ModelState.FAILED, ModelState.UNLOADED}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.UNLOADED}),
    ModelState.READY: frozenset(
        {ModelState.DRAINING, ModelState.SLEEPING, ModelState.FAILED, ModelState.UNAVAILABLE}
    ),
    ModelState.SLEEPING: frozenset({ModelState.LOADING, ModelState.DRAINING, ModelState.FAILED}),
    ModelState.DRAINING: frozenset({ModelState.UNLOADED, ModelState.FAILED}),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.DOWNLOADING, ModelState.UNLOADED}),
    ModelState.UNAVAILABLE: frozenset({ModelState.READY}),
}


def is_legal(old: ModelState, new: ModelState) -> bool:
    """True when the transition table allows going from ``old`` to ``new``."""
    return new in TRANSITIONS[old]


class IllegalTransitionError(LifecycleError):
    """A state change was asked from a state that does not allow it."""

    def __init__(
        self,
        model: str,
        current: ModelState,
        new: ModelState,
        reason: str,
        expected: Collection[ModelState],
    ) -> None:
        self.model = model
        self.current = current
        self.new = new
        self.reason = reason
        self.expected = frozenset(expected)
        if current not in self.expected:
            why = f"expected {_names(self.expected)}"
        else:
            why = f"{current.value} -> {new.value} is not a legal transition"
        super().__init__(
            f"model {model}: cannot change to {new.value} ({reason}): it is {current.value}; {why}"
        )


@dataclass(frozen=True)
class Transition:
    """One change of state, as handed to the ``on_transition`` callback."""

    model: str
    old: ModelState
    new: ModelState
    reason: str
    at: float  # wall-clock time of the change (time.time()), for logs and the admin API
    seconds_in_old: float  # how long the model was in ``old`` (monotonic), for metrics


class Lifecycle:
    """The state of one model, changed only through :meth:`swap`.

    Single event loop only: ``swap`` is synchronous, so between two awaits nothing else can
    run and the compare and the swap happen as one step. Do not call it from another thread.
    """

    def __init__(
        self,
        model: str,
        on_transition: Callable[[Transition], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        initial: ModelState = ModelState.UNLOADED,
    ) -> None:
        self.model = model
        self._on_transition = on_transition
        self._clock = clock
        self._wall_clock = wall_clock
        self._state = initial
        self._since = clock()
        # One Event per "generation" of state: swap sets it (waking every waiter at once) and
        # puts a fresh one in its place. asyncio.Event binds to a loop only on first wait, so
        # building it here, outside any loop, is fine.
        self._changed = asyncio.Event()

    @property
    def state(self) -> ModelState:
        """The current state."""
        return self._state

    @property
    def since(self) -> float:
        """When (``clock()``, monotonic by default) the model entered its current state."""
        return self._since

    def swap(
        self,
        expected: ModelState | Collection[ModelState],
        new: ModelState,
        reason: str,
    ) -> Transition:
        """Change to ``new`` if the state is one of ``expected`` and the table allows it.

        The one way the state changes. Atomic on one event loop because it never awaits. On
        success it wakes every :meth:`wait_for` waiter, then calls ``on_transition``; the change
        stands even if that callback raises (the error is logged, not re-raised, so a logging
        or metrics bug cannot leave the supervisor believing a change did not happen).

        Raises:
            IllegalTransitionError: the state is not among ``expected``, or the change is not
                in :data:`TRANSITIONS`. Nothing changes.
        """
        # ModelState is a str, and a str is a Collection: test for the single state first.
        allowed = frozenset({expected}) if isinstance(expected, ModelState) else frozenset(expected)
        old = self._state
        if old not in allowed or not is_legal(old, new):
            raise IllegalTransitionError(self.model, old, new, reason, allowed)
        now = self._clock()
        transition = Transition(
            model=self.model,
            old=old,
            new=new,
            reason=reason,
            at=self._wall_clock(),
            seconds_in_old=now - self._since,
        )
        self._state = new
        self._since = now
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_transition is not None:
            try:
                self._on_transition(transition)
            except Exception:
                logger.exception(
                    "model %s: on_transition failed for %s -> %s", self.model, old.value, new.value
                )
        return transition

    async def wait_for(
        self, states: ModelState | Collection[ModelState], timeout: float | None
    ) -> ModelState:
        """Wait until the state is one of ``states``; return the state then.

        Returns at once when it already is. When ``timeout`` seconds pass first, returns the
        current state instead of raising: the caller compares the result with ``states`` and
        picks the error (a model still loading and one that failed read differently to a
        client). ``timeout=None`` waits without bound.
        """
        wanted = frozenset({states}) if isinstance(states, ModelState) else frozenset(states)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._state not in wanted:
            # No await between reading the state and taking the event, so a swap cannot slip
            # in between and be missed.
            changed = self._changed
            if deadline is None:
                await changed.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._state

    def __repr__(self) -> str:
        return f"Lifecycle(model={self.model!r}, state={self._state.value})"


def _names(states: Collection[ModelState]) -> str:
    """``unloaded or failed``: states in table order, for messages."""
    ordered = [s.value for s in ModelState if s in states]
    return " or ".join(ordered) if ordered else "nothing"
