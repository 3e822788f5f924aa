"""Lending a model's engine to requests, the same way for every kind of entry.

``Lending.acquire`` admits one request against the model's queue limit (counted on the lending
board, so in every HTTP process), waits (bounded) while a local model loads or wakes, and
counts the request in flight until it ends; ``in_flight`` and ``drained`` are what unloading
and sleeping wait on. A remote entry is lent its proxy, whose backend health is its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from appliance.catalogue.schema import LocalModelSpec, RemoteModelSpec
from appliance.engines.base import Engine
from appliance.errors import (
    ApplianceError,
    BackendUnavailableError,
    EvictionTooSoonError,
    ModelDownloadingError,
    ModelDrainingError,
    ModelFailedError,
    ModelLoadingError,
    ModelNotReadyError,
    ModelUnloadedError,
    RateLimitedError,
)
from appliance.supervisor.handle import ModelHandle
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.supervisor.supervisor import Supervisor

S = ModelState


class Lending:
    """Lends the engines of ``supervisor``'s table (its board, limits and loads)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def worker_use(self, handle: ModelHandle) -> tuple[int, float]:
        """Requests HTTP workers admitted by themselves and have in flight on ``handle``, and
        when they last used it (its own ``last_used`` when later)."""
        if handle.slot is None:
            return 0, handle.last_used
        board = self._supervisor.board
        return board.in_workers(handle.slot), max(handle.last_used, board.last_used(handle.slot))

    def in_flight(self, handle: ModelHandle) -> int:
        """Requests in flight on ``handle`` in every HTTP process."""
        return handle.in_flight + self.worker_use(handle)[0]

    async def drained(self, handle: ModelHandle, timeout: float) -> None:
        """Wait (at most ``timeout``) until no request is in flight on ``handle`` here or in
        an HTTP worker (whose requests end unseen: their count is polled)."""
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(handle.idle.wait(), timeout)
        while self.worker_use(handle)[0] > 0:
            if time.monotonic() >= deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(0.02)

    def queue_limit(self, handle: ModelHandle) -> int:
        """Requests ``handle`` may have in flight or waiting, in every HTTP process."""
        return handle.spec.max_queue or self._supervisor.limits.max_queue

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Lend ``name``'s engine to one request; wait (bounded) while a local model loads.

        The same for every kind of entry: beyond the model's queue limit a 429, and the
        request counts as in flight until the context exits (for a stream, when the stream
        ends); unloading waits for that.
        """
        supervisor = self._supervisor
        handle = supervisor.get(name)
        limit = self.queue_limit(handle)
        # In flight or waiting, in this process and (on the board) in every HTTP worker.
        slot = handle.slot
        if not (
            supervisor.board.reserve(slot, limit)
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
                supervisor.board.unreserve(slot)

    async def _local_engine(self, handle: ModelHandle, spec: LocalModelSpec) -> Engine:
        """The ready engine of a local model, after waiting (bounded) for a load or wake."""
        supervisor = self._supervisor
        load: asyncio.Task[None] | None = None
        if handle.state is S.UNLOADED and spec.load_on_demand:
            load = supervisor.loading.ensure_loading(handle, "load on demand")
        elif handle.state is S.SLEEPING and spec.load_on_demand:
            load = supervisor.loading.ensure_waking(handle, "wake on demand")
        elif handle.state in (S.LOADING, S.DOWNLOADING):
            load = handle.load_task
        if load is not None:
            handle.waiting += 1
            try:
                # asyncio.wait neither raises the load's error nor cancels the load on timeout.
                await asyncio.wait({load}, timeout=supervisor.limits.load_wait_seconds)
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
            supervisor.supervision.mark_failed(handle, "engine died")
            raise self._not_ready(handle)
        return engine

    def _remote_engine(self, handle: ModelHandle) -> Engine:
        """The proxy of a remote entry. It is lent even while unavailable: its circuit breaker
        answers 503 with Retry-After at once, and lets the probe through that closes it."""
        remotes = self._supervisor.remotes
        if remotes is None or not isinstance(handle.spec, RemoteModelSpec):
            raise BackendUnavailableError(f"model {handle.name!r}: remote backends are not enabled")
        handle.engine = remotes.get(handle.spec)
        self.follow_remote(handle)
        return handle.engine

    def follow_remote(self, handle: ModelHandle) -> None:
        """Turn a remote entry's backend health into its state: ready or unavailable."""
        if handle.local is not None or handle.engine is None:
            return
        up = handle.engine.is_alive()
        if up and handle.state is S.UNAVAILABLE:
            handle.lifecycle.swap(S.UNAVAILABLE, S.READY, "the backend answers again")
        elif not up and handle.state is S.READY:
            handle.lifecycle.swap(S.READY, S.UNAVAILABLE, "the backend stopped answering")

    def _not_ready(self, handle: ModelHandle) -> ApplianceError:
        """The error a request for ``handle`` gets while it cannot be served: its state's."""
        retry = self._supervisor.limits.retry_after_seconds
        name = handle.name
        state = handle.state
        if state is S.LOADING:
            return ModelLoadingError(f"model {name!r} is still loading", retry_after=retry)
        if state is S.DOWNLOADING and handle.download is not None:
            progress = handle.download
            return ModelDownloadingError(
                f"model {name!r} is {progress.describe()}; it loads next",
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
