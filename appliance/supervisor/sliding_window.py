"""A sliding-window rate limit (the on-demand load gate's loads per minute).

A plain object driven by an injectable clock, so tests move time by hand, used from the
event loop only: a check and the admission that follows it happen with no ``await`` between
them, so no lock is needed. Per-key limits are counted on the lending board instead
(``appliance.supervisor.lending_board``), which every HTTP process shares.
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

    def retry_after(self) -> float | None:
        """None if a request may be admitted now, else seconds until the oldest slot frees."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        if len(self._times) < self.limit:
            return None
        return self._times[0] + self.window - now

    def admit(self) -> None:
        """Count one request now; call only after ``retry_after()`` returned None."""
        self._times.append(self._clock())
