"""Failed API keys slow down the client that sends them, and only that client.

A client (an IPv4 address, or an IPv6 /64, which one host can fill at will) may send a few
wrong keys for free; past those each further failure doubles how long that client's keys are
not checked at all (429 with Retry-After, whatever key it sends), up to a ceiling. A right key
after the wait clears its record. So guessing keys over the LAN runs at a few guesses a
minute per address, while every other client is served as before. The records are bounded:
past ``max_clients`` the oldest one is forgotten (forgetting only ever lets a client in
sooner, never locks anyone out).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


FORGET_AFTER_SECONDS = 900.0
"""A client whose last wrong key is this old starts afresh (a typo last week costs nothing)."""


@dataclass
class _Record:
    failures: int
    blocked_until: float
    last: float


def client_of(address: IPAddress | None) -> str:
    """The unit a record is kept for: the IPv4 address, the IPv6 /64, or ``""`` when the
    peer is no IP (a Unix socket, a test client): those share one record."""
    if address is None:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthBackoff:
    """Per-client records of failed keys, and how long each client must wait."""

    def __init__(
        self,
        *,
        free_failures: int,
        max_delay_seconds: float,
        clock: Callable[[], float],
        max_clients: int = 4096,
    ) -> None:
        self._free = free_failures
        self._max_delay = max_delay_seconds
        self._clock = clock
        self._max_clients = max_clients
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def wait(self, client: str) -> float | None:
        """Seconds ``client`` must still wait before its keys are checked; None: go on."""
        record = self._records.get(client)
        if record is None:
            return None
        left = record.blocked_until - self._clock()
        return left if left > 0 else None

    def failed(self, client: str) -> None:
        """Note a wrong key from ``client``; past the free ones, it waits (doubling)."""
        now = self._clock()
        record = self._records.pop(client, None)
        if record is None or now - record.last > FORGET_AFTER_SECONDS:
            record = _Record(0, 0.0, now)
        record.failures += 1
        record.last = now
        over = record.failures - self._free
        if over > 0:
            delay = min(self._max_delay, 2.0 ** (over - 1))
            record.blocked_until = now + delay
        self._records[client] = record  # the most recent last
        while len(self._records) > self._max_clients:
            self._records.popitem(last=False)

    def succeeded(self, client: str) -> None:
        """A right key from ``client``: its record goes."""
        self._records.pop(client, None)
