"""A circuit breaker: stop calling a backend that keeps failing, and probe it now and then.

Closed, it counts consecutive failures; open, it refuses at once (so a dead backend costs no
time); after the cool-down one probe request decides whether it closes again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(str, enum.Enum):
    """Where a circuit breaker stands."""

    CLOSED = "closed"  # requests pass; consecutive failures are counted
    OPEN = "open"  # requests are refused at once, without touching the network
    HALF_OPEN = "half_open"  # the cool-down is over: one probe request may pass


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; one probe after ``cool_down``."""

    def __init__(
        self,
        failure_threshold: int,
        cool_down: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cool_down = cool_down
        self.failures = 0
        self._clock = clock
        self._on_change = on_change
        self._opened_at: float | None = None
        self._probing = False  # a half-open probe is in flight

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN turns HALF_OPEN by itself when the cool-down ends."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cool_down:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def admit(self) -> float | None:
        """None if a request may go now (taking the probe slot when half-open); else Retry-After."""
        state = self.state
        if state is BreakerState.CLOSED:
            return None
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            self._changed(BreakerState.OPEN, BreakerState.HALF_OPEN)
            return None
        if state is BreakerState.OPEN:
            assert self._opened_at is not None
            return max(0.1, self.cool_down - (self._clock() - self._opened_at))
        return 1.0  # half-open with its probe in flight: the probe decides soon

    def record_success(self) -> None:
        """The backend answered: close the breaker."""
        old = self.state
        self.failures, self._opened_at, self._probing = 0, None, False
        if old is not BreakerState.CLOSED:
            self._changed(old, BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The backend failed; open once the threshold is reached, or if a probe failed."""
        old = self.state
        self.failures += 1
        self._probing = False
        # While OPEN the cool-down is not restarted, so failing health checks cannot keep a
        # breaker open for ever; a failed probe (HALF_OPEN) starts a fresh cool-down.
        if old is BreakerState.HALF_OPEN or (
            old is BreakerState.CLOSED and self.failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
            self._changed(old, BreakerState.OPEN)

    def release(self) -> None:
        """A request ended with no verdict (the client left): free the probe slot."""
        self._probing = False

    def _changed(self, old: BreakerState, new: BreakerState) -> None:
        if self._on_change is not None:
            self._on_change(old, new)
