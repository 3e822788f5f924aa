"""Several request observers behind the one the request-context middleware calls."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.request_info import RequestInfo, RequestObserver


class RequestObservers:
    """Tells each observer, in order, about every finished request."""

    def __init__(self, observers: Sequence[RequestObserver]) -> None:
        self._observers = tuple(observers)

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Pass the finished request on to every observer."""
        for observer in self._observers:
            observer.on_request_done(info, status, seconds)
