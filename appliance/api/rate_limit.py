"""Per-key limits: requests per minute (a sliding window) and requests in flight.

Both are plain objects driven by an injectable clock, so tests move time by hand. They are
used from the event loop only: a check and the admission that follows it happen with no
``await`` between them, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never goes backwards (``time.monotonic``)."""


class SlidingWindow:
    """At most ``limit`` admissions in any ``window`` seconds.

    A log of admission times rather than a fixed per-minute counter: a fixed window lets a
    client send ``2 * limit`` requests across a minute boundary. The log holds at most
    ``limit`` times, so memory is bounded by the limit, not the traffic.
    """

    def __init__(self, limit: int, *, window: float = 60.0, clock: Clock = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque()

    def retry_after(self, count: int = 1) -> float | None:
        """None if ``count`` more may be admitted now, else seconds until enough slots free
        (``count`` must not exceed ``limit``)."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        if len(self._times) + count <= self.limit:
            return None
        # The slot that must expire before ``count`` fit: the oldest ones go first.
        return self._times[len(self._times) + count - self.limit - 1] + self.window - now

    def admit(self, count: int = 1) -> None:
        """Count ``count`` requests now; call only after ``retry_after(count)`` returned
        None."""
        now = self._clock()
        self._times.extend([now] * count)


class ConcurrencyLimit:
    """At most ``limit`` requests in flight; a slot is held until ``release``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_flight = 0

    def full(self) -> bool:
        """Whether every slot is taken."""
        return self.in_flight >= self.limit

    def acquire(self) -> None:
        """Take a slot; call only after ``full()`` returned False."""
        self.in_flight += 1

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1


class KeyLimits:
    """The limits of one API key; either may be absent (no limit)."""

    def __init__(
        self,
        *,
        requests_per_minute: int | None,
        max_concurrent: int | None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate = (
            SlidingWindow(requests_per_minute, clock=clock)
            if requests_per_minute is not None
            else None
        )
        self.concurrency = ConcurrencyLimit(max_concurrent) if max_concurrent is not None else None

    def try_acquire(self) -> float | None:
        """Admit one request (None), or refuse it with the seconds to wait before retrying.

        Both limits are checked before either is charged, so a request refused for one limit
        does not use up the other; refused requests are not counted, so a client that keeps
        retrying while limited is not locked out for longer.
        """
        wait = self.rate.retry_after() if self.rate is not None else None
        if wait is not None:
            return wait
        if self.concurrency is not None and self.concurrency.full():
            # No way to know when a request in flight ends; one second is the usual hint.
            return 1.0
        if self.rate is not None:
            self.rate.admit()
        if self.concurrency is not None:
            self.concurrency.acquire()
        return None

    @property
    def requests_per_minute(self) -> int | None:
        """The rate limit (None: none)."""
        return self.rate.limit if self.rate is not None else None

    def try_admit_more(self, count: int) -> float | None:
        """Count ``count`` more requests per minute for a request admitted already (its other
        sequences: ``n`` copies, batch items), or refuse (seconds to wait) and count none.
        Concurrency is not charged: they run as one request. ``count`` must not exceed the
        rate limit."""
        if self.rate is None or count <= 0:
            return None
        wait = self.rate.retry_after(count)
        if wait is None:
            self.rate.admit(count)
        return wait

    def release(self) -> None:
        """The request admitted by ``try_acquire`` has finished."""
        if self.concurrency is not None:
            self.concurrency.release()
