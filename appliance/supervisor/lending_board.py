"""The lending board: the counters every HTTP process of one appliance admits requests by.

A request is admitted against three things that must hold across all HTTP processes at once:
its key's rate and concurrency limits and its model's queue limit; and it may only be lent an
engine the model table still lends. Asking the owner for each request costs a round trip, so
the owner publishes them here instead: a small file in its private runtime directory, mapped
into every process, each change made under one ``flock``. A worker then admits a request for
a ready local model by itself, exactly as the owner would (the same counters, under the same
lock), and falls back to asking the owner for anything else (a load, a wait, an error to
word). With one HTTP process the board is private memory and the lock does nothing.

Layout (all fixed at creation, computed alike in every process from the keys file):
int64 cells ``[table generation | per entry: open generation, count, in workers |
per key: in flight, window start, window length]``, float64 cells ``[per entry: last used |
per key: the admission times of its sliding window]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ENTRY_SLOTS = 512
"""Entries with a slot of their own; any further entry is always admitted by the owner."""

_ENTRY_INTS = 3  # open generation, count (owner's and workers' together), in workers
_KEY_INTS = 3  # in flight, window start, window length
_HEADER_INTS = 1  # table generation

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never goes backwards (``time.monotonic``: one clock
for every process of the host)."""


@dataclass(frozen=True)
class KeyCells:
    """Where one key's limit counters live on a board."""

    board: LendingBoard
    ints: int  # index of its first int cell
    times: int  # index of its first float cell (its window's admission times)
    window: int  # the window's capacity: the key's requests per minute (0: none)


class LendingBoard:
    """Counters shared by the owner and its HTTP workers (see the module docstring)."""

    def __init__(
        self, memory: mmap.mmap, rates: Sequence[int], *, lock_fd: int | None = None
    ) -> None:
        self._memory = memory
        self._lock_fd = lock_fd
        self._depth = 0
        ints = _HEADER_INTS + ENTRY_SLOTS * _ENTRY_INTS + len(rates) * _KEY_INTS
        self._ints = memoryview(memory)[: ints * 8].cast("q")
        self._floats = memoryview(memory)[ints * 8 :].cast("d")
        self._keys: list[KeyCells] = []
        times = ENTRY_SLOTS
        for index, rate in enumerate(rates):
            base = _HEADER_INTS + ENTRY_SLOTS * _ENTRY_INTS + index * _KEY_INTS
            self._keys.append(KeyCells(self, base, times, rate))
            times += rate

    # -- making one ----------------------------------------------------------------------

    @staticmethod
    def size_of(rates: Sequence[int]) -> int:
        """Bytes a board for keys with these windows takes."""
        ints = _HEADER_INTS + ENTRY_SLOTS * _ENTRY_INTS + len(rates) * _KEY_INTS
        return (ints + ENTRY_SLOTS + sum(rates)) * 8

    @classmethod
    def private(cls, rates: Sequence[int] = ()) -> LendingBoard:
        """A board for one HTTP process: private memory, no lock needed."""
        return cls(mmap.mmap(-1, cls.size_of(rates)), rates)

    @classmethod
    def create(cls, path: Path, rates: Sequence[int] = ()) -> LendingBoard:
        """A new shared board at ``path`` (in a directory only this user may enter)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, cls.size_of(rates))
        return cls(mmap.mmap(fd, cls.size_of(rates)), rates, lock_fd=fd)

    @classmethod
    def attach(cls, path: Path, rates: Sequence[int] = ()) -> LendingBoard:
        """The shared board the owner made at ``path``, for a worker."""
        fd = os.open(path, os.O_RDWR)
        return cls(mmap.mmap(fd, cls.size_of(rates)), rates, lock_fd=fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the board's lock (re-entrant within one process)."""
        if self._lock_fd is None or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- the table as a whole ------------------------------------------------------------

    @property
    def table_generation(self) -> int:
        """Changes whenever names, aliases or adapters change: workers forget what they
        resolved when it does."""
        return self._ints[0]

    def table_changed(self) -> None:
        """Names, aliases or adapters changed."""
        with self.locked():
            self._ints[0] += 1

    # -- entries -------------------------------------------------------------------------

    def _entry(self, slot: int) -> int:
        return _HEADER_INTS + slot * _ENTRY_INTS

    def open(self, slot: int) -> int:
        """The entry in ``slot`` is ready with a new engine: workers may lend it (under the
        generation returned, which they learn from the owner)."""
        with self.locked():
            base = self._entry(slot)
            generation = abs(self._ints[base]) + 1
            self._ints[base] = generation
            return generation

    def close(self, slot: int) -> None:
        """The entry in ``slot`` is no longer lent by workers (its generation is kept,
        negated, so the next ``open`` moves past it)."""
        with self.locked():
            base = self._entry(slot)
            if self._ints[base] > 0:
                self._ints[base] = -self._ints[base]

    def generation(self, slot: int) -> int:
        """The generation workers may lend ``slot`` under; 0 or less: not lent now."""
        return self._ints[self._entry(slot)]

    def count(self, slot: int) -> int:
        """Requests in flight or waiting on ``slot``'s entry, in every process."""
        return self._ints[self._entry(slot) + 1]

    def in_workers(self, slot: int) -> int:
        """Requests HTTP workers admitted by themselves, in flight on ``slot``'s entry."""
        return self._ints[self._entry(slot) + 2]

    def last_used(self, slot: int) -> float:
        """When a worker last lent or gave back ``slot``'s entry (``time.monotonic``)."""
        return self._floats[slot]

    def reserve(self, slot: int, limit: int) -> bool:
        """Count one more request on ``slot`` if fewer than ``limit`` are in flight or
        waiting (the owner's admission); False: the queue is full."""
        with self.locked():
            base = self._entry(slot)
            if self._ints[base + 1] >= limit:
                return False
            self._ints[base + 1] += 1
            return True

    def unreserve(self, slot: int) -> None:
        """A request ``reserve`` counted is done."""
        with self.locked():
            self._ints[self._entry(slot) + 1] -= 1

    def lend(self, slot: int, generation: int, limit: int, key: KeyLimits | None) -> bool:
        """A worker's whole admission of one request, at once: the entry is still lent under
        ``generation``, its queue has room, and the key's limits admit it (then all are
        charged). False: nothing was charged; ask the owner."""
        with self.locked():
            base = self._entry(slot)
            if generation <= 0 or self._ints[base] != generation:
                return False
            if self._ints[base + 1] >= limit:
                return False
            if key is not None and key.try_acquire() is not None:
                return False
            self._ints[base + 1] += 1
            self._ints[base + 2] += 1
            self._floats[slot] = time.monotonic()
            return True

    def give_back(self, slot: int, key: KeyLimits | None) -> None:
        """A request ``lend`` admitted is done."""
        with self.locked():
            base = self._entry(slot)
            self._ints[base + 1] -= 1
            self._ints[base + 2] -= 1
            self._floats[slot] = time.monotonic()
            if key is not None:
                key.release()

    # -- keys ----------------------------------------------------------------------------

    def key_cells(self, index: int) -> KeyCells:
        """The cells of the ``index``-th key (in the order the board was made with)."""
        return self._keys[index]


class KeyLimits:
    """One API key's requests-per-minute (a sliding window) and in-flight limits, kept on a board
    so that every HTTP process charges the same counters.

    A log of admission times rather than a fixed per-minute counter: a fixed window lets a
    client send ``2 * limit`` requests across a minute boundary. The log holds at most
    ``limit`` times, so memory is bounded by the limit, not the traffic.
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None,
        max_concurrent: int | None,
        cells: KeyCells | None = None,
        window: float = 60.0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``cells``: where on a board the counters live (None: a private board of its own)."""
        if cells is None:
            cells = LendingBoard.private([requests_per_minute or 0]).key_cells(0)
        if requests_per_minute is not None and requests_per_minute < 1:
            raise ValueError("limit must be at least 1")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError("limit must be at least 1")
        if (requests_per_minute or 0) > cells.window:
            # Its admission times would run into the next key's cells.
            raise ValueError(
                f"a window of {requests_per_minute} does not fit cells made for {cells.window}"
            )
        self._cells = cells
        self._board = cells.board
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent
        self._window = window
        self._clock = clock

    @property
    def in_flight(self) -> int:
        """Requests of this key in flight, in every process."""
        return self._board._ints[self._cells.ints]

    def _retry_after(self) -> float | None:
        limit = self.requests_per_minute
        if limit is None:
            return None
        ints, floats, cells = self._board._ints, self._board._floats, self._cells
        now = self._clock()
        start, length = ints[cells.ints + 1], ints[cells.ints + 2]
        while length and floats[cells.times + start] <= now - self._window:
            start = (start + 1) % limit
            length -= 1
        ints[cells.ints + 1], ints[cells.ints + 2] = start, length
        if length < limit:
            return None
        return floats[cells.times + start] + self._window - now

    def try_acquire(self) -> float | None:
        """Admit one request (None), or refuse it with the seconds to wait before retrying.

        Both limits are checked before either is charged, so a request refused for one limit
        does not use up the other; refused requests are not counted, so a client that keeps
        retrying while limited is not locked out for longer.
        """
        with self._board.locked():
            wait = self._retry_after()
            if wait is not None:
                return wait
            ints, cells = self._board._ints, self._cells
            if self.max_concurrent is not None and ints[cells.ints] >= self.max_concurrent:
                # No way to know when a request in flight ends; one second is the usual hint.
                return 1.0
            if self.requests_per_minute is not None:
                start, length = ints[cells.ints + 1], ints[cells.ints + 2]
                self._board._floats[cells.times + (start + length) % self.requests_per_minute] = (
                    self._clock()
                )
                ints[cells.ints + 2] = length + 1
            ints[cells.ints] += 1
            return None

    def try_admit_more(self, count: int) -> float | None:
        """Count ``count`` more requests per minute for a request admitted already (its other
        sequences: ``n`` copies, batch items), or refuse (seconds to wait) and count none.
        Concurrency is not charged: they run as one request. ``count`` must not exceed the
        rate limit."""
        limit = self.requests_per_minute
        if limit is None or count <= 0:
            return None
        with self._board.locked():
            self._retry_after()  # drops what left the window
            ints, floats, cells = self._board._ints, self._board._floats, self._cells
            start, length = ints[cells.ints + 1], ints[cells.ints + 2]
            if length + count > limit:
                # The admission that must leave the window before ``count`` more fit.
                oldest = floats[cells.times + (start + length + count - limit - 1) % limit]
                return oldest + self._window - self._clock()
            now = self._clock()
            for offset in range(count):
                floats[cells.times + (start + length + offset) % limit] = now
            ints[cells.ints + 2] = length + count
            return None

    def release(self) -> None:
        """The request admitted by ``try_acquire`` has finished."""
        with self._board.locked():
            self._board._ints[self._cells.ints] -= 1
