"""A model's admission queue: at most C requests in its engine, the rest waiting in order.

Requests wait in order of (priority, virtual finish time). Priority first (lower is served
earlier, as vLLM's ``priority``); among equal priority, start-time fair queuing (SFQ, Goyal et
al. 1996) across keys: each key's requests are stamped with a virtual start
``S = max(V, F_key)`` and finish ``F = S + cost / weight``, where ``F_key`` is the finish of
that key's previous request and ``V`` the start of the request last let in at that priority.
A key that sends ten times as many requests runs ten times further ahead in virtual time, so
the others' requests pass its backlog: each key gets its weighted share of the slots while it
has requests waiting, and a key alone gets them all (the queue never idles a free slot).

``FairQueue`` is the pure ordering (no clock, no asyncio: tests drive it with simulated
arrivals); ``ModelGate`` is the asynchronous gate a request waits at, built on it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class FairShareSettings(BaseModel):
    """How each local model's admission queue lets requests into its engine."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description=(
            "Order each model's waiting requests by priority, then fairly across keys; off: "
            "every request goes straight to the engine, in arrival order."
        ),
    )
    default_in_engine: int = Field(
        256,
        ge=1,
        description=(
            "Requests let into a model's engine at once when its entry sets neither "
            "max_in_engine nor the engine's max_num_seqs (vLLM's own default on most GPUs)."
        ),
    )
    unknown_max_tokens: int = Field(
        512,
        ge=1,
        description="Tokens a request that sets no max_tokens is charged in the fair share.",
    )
    max_wait_seconds: float = Field(
        120.0,
        gt=0,
        description="Longest a request waits for a place in its model's engine before a 429.",
    )


@dataclass(order=True)
class Ticket:
    """One request's place in a ``FairQueue``: ordered by priority, then virtual finish."""

    priority: int
    finish: float
    seq: int
    start: float = field(compare=False)
    key: str = field(compare=False)
    granted: bool = field(default=False, compare=False)
    gone: bool = field(default=False, compare=False)


class FairQueue:
    """The ordering of one model's requests; ``capacity`` of them may run at once."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.running = 0
        self._heap: list[Ticket] = []
        self._waiting = 0
        self._seq = itertools.count()
        self._virtual: dict[int, float] = {}  # per priority: start of the last let in
        self._finish: dict[tuple[int, str], float] = {}  # per (priority, key): last finish

    @property
    def waiting(self) -> int:
        """Requests waiting for a place."""
        return self._waiting

    def arrive(self, key: str, priority: int, cost: float, weight: float = 1.0) -> Ticket:
        """Stamp a new request of ``key`` that costs ``cost`` (tokens, say) and queue it; it
        is granted at once (``ticket.granted``) when a place is free and nobody waits."""
        virtual = self._virtual.get(priority, 0.0)
        start = max(virtual, self._finish.get((priority, key), 0.0))
        finish = start + max(cost, 1.0) / weight
        self._finish[priority, key] = finish
        ticket = Ticket(priority, finish, next(self._seq), start, key)
        heapq.heappush(self._heap, ticket)
        self._waiting += 1
        self.grant()
        return ticket

    def grant(self) -> list[Ticket]:
        """Let waiting requests in, first in order, while places are free; returns them."""
        granted = []
        while self.running < self.capacity and self._heap:
            ticket = heapq.heappop(self._heap)
            if ticket.gone:
                continue
            self._waiting -= 1
            self.running += 1
            ticket.granted = True
            self._virtual[ticket.priority] = max(
                self._virtual.get(ticket.priority, 0.0), ticket.start
            )
            granted.append(ticket)
        if not self._heap and self.running == 0:
            # Idle: what keys ran ahead no longer matters (SFQ's virtual time restarts).
            self._virtual.clear()
            self._finish.clear()
        return granted

    def withdraw(self, ticket: Ticket) -> None:
        """A waiting request gave up (its client left, or it waited too long)."""
        if ticket.granted or ticket.gone:
            return
        ticket.gone = True
        self._waiting -= 1

    def leave(self, ticket: Ticket) -> list[Ticket]:
        """A granted request is done: its place goes to the next; returns those let in."""
        if ticket.granted and not ticket.gone:
            ticket.gone = True
            self.running -= 1
        return self.grant()


class QueueTimeoutError(Exception):
    """A request waited ``max_wait_seconds`` without a place (the caller answers 429)."""


class ModelGate:
    """The asynchronous gate in front of one model's engine, ordered by a ``FairQueue``."""

    def __init__(self, capacity: int, max_wait_seconds: float) -> None:
        self.queue = FairQueue(capacity)
        self._max_wait = max_wait_seconds
        self._wakers: dict[int, asyncio.Future[None]] = {}

    async def enter(self, key: str, priority: int, cost: float, weight: float = 1.0) -> Ticket:
        """Wait for a place in the engine; raises ``QueueTimeoutError`` after the longest
        wait. On cancellation (the client left) the request leaves the queue."""
        ticket = self.queue.arrive(key, priority, cost, weight)
        if ticket.granted:
            return ticket
        waker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakers[ticket.seq] = waker
        try:
            await asyncio.wait_for(asyncio.shield(waker), self._max_wait)
        except BaseException as exc:
            self._wakers.pop(ticket.seq, None)
            if ticket.granted:
                # Let in just as it gave up: the place is handed on.
                self._wake(self.queue.leave(ticket))
            else:
                self.queue.withdraw(ticket)
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueTimeoutError from None
            raise
        return ticket

    def resize(self, capacity: int) -> None:
        """Let ``capacity`` requests in at once from now on (the entry changed)."""
        self.queue.capacity = max(1, capacity)
        self._wake(self.queue.grant())

    def leave(self, ticket: Ticket) -> None:
        """The request is done with the engine: its place goes to the next in order."""
        self._wake(self.queue.leave(ticket))

    def _wake(self, granted: list[Ticket]) -> None:
        for ticket in granted:
            waker = self._wakers.pop(ticket.seq, None)
            if waker is not None and not waker.done():
                waker.set_result(None)
