"""What is known about one HTTP request: filled in by the edge (middleware and routes), read
by whoever observes finished requests (the access log, metrics, per-key usage)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.types import Scope

from appliance.engines.base import Usage

INFO_KEY = "appliance.request"


@dataclass
class RequestInfo:
    """What the route learns about a request, for the access log and metrics."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    endpoint: str | None = None
    usage: Usage | None = None
    stream: bool = False
    first_token_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RequestObserver(Protocol):
    """Told about every finished request (metrics implement this)."""

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """A request finished with ``status`` after ``seconds``."""
        ...


def request_info(scope: Scope) -> RequestInfo:
    """The ``RequestInfo`` the middleware put in ``scope``."""
    return scope[INFO_KEY]  # type: ignore[no-any-return]
