"""The ``downloading`` step of a load: what the supervisor asks of a fetcher, and the progress.

A model whose files are not on disk is fetched before its engine is placed and started, so a
long download holds no device memory and evicts nobody, and its progress (bytes done, total,
rate) shows in ``models ps``, ``/admin/models`` and ``/metrics``. Requests meanwhile get a 503
whose Retry-After is the time left at the measured rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.catalogue.schema import ModelSpec

# Bounds of a Retry-After from the download rate: not sooner than a second, and not so late
# that a client gives up on a download that speeds up.
MIN_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 300.0


@dataclass
class DownloadProgress:
    """Bytes of one model's download: written by the fetcher's thread, read by the API."""

    total_bytes: int = 0
    done_bytes: int = 0
    cached_bytes: int = 0  # on disk before this download started (not counted in the rate)
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    # "downloading" (bytes from the hub) or "converting" (a .gguf source becoming a
    # safetensors folder, which has steps, not a byte rate); detail: the step under way.
    activity: str = "downloading"
    detail: str = ""

    def __post_init__(self) -> None:
        self.started = self.clock()

    def bytes_per_second(self) -> float | None:
        """The rate so far (None until a second has passed with bytes moved)."""
        elapsed = self.clock() - self.started
        moved = self.done_bytes - self.cached_bytes
        if elapsed < 1.0 or moved <= 0:
            return None
        return moved / elapsed

    def seconds_left(self) -> float | None:
        """Time to the end at the rate so far (None while the rate is unknown)."""
        rate = self.bytes_per_second()
        if rate is None or self.total_bytes <= 0:
            return None
        return max(0.0, self.total_bytes - self.done_bytes) / rate

    def retry_after(self, default: float) -> float:
        """What a 503 tells a client to wait: the time left, bounded; ``default`` if unknown."""
        left = self.seconds_left()
        if left is None:
            return default
        return min(MAX_RETRY_SECONDS, max(MIN_RETRY_SECONDS, left))

    def describe(self) -> str:
        """What the step is doing, for a 503's message: ``downloading its files (3 of 9
        bytes)`` or ``converting its GGUF file (dequantizing the weights)``."""
        if self.activity == "converting":
            return f"converting its GGUF file ({self.detail or 'starting'})"
        return f"downloading its files ({self.done_bytes} of {self.total_bytes} bytes)"

    def as_status(self) -> dict[str, Any]:
        """Plain data for ``/admin/models``."""
        rate = self.bytes_per_second()
        left = self.seconds_left()
        return {
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "bytes_per_second": round(rate) if rate is not None else None,
            "seconds_left": round(left, 1) if left is not None else None,
            "activity": self.activity,
            "detail": self.detail,
        }


class WeightsFetcher(Protocol):
    """Fetches a model's files before its engine starts (``appliance.hub.fetcher.HubFetcher``)."""

    def missing(self, spec: ModelSpec) -> bool:
        """True when ``spec``'s files must be downloaded before it can load (cheap: no network)."""
        ...

    async def fetch(self, spec: ModelSpec, progress: DownloadProgress) -> None:
        """Download ``spec``'s files, updating ``progress``; cancellable between files."""
        ...
