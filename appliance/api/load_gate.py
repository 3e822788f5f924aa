"""On-demand loads: who may trigger one, and how many, so no key can make models churn.

A request for a ``load_on_demand`` model that is not loaded starts a load (and maybe evicts
another model to make room). Unchecked, any key could make two such models load and evict
each other in a loop, keeping the GPUs busy with loading. ``LoadGate.check`` runs before a
request reaches the model: it refuses keys that may not load (``may_load: false`` in the keys
file), a load while the most loads at once are running (503), and loads past a per-minute cap
(429), each with Retry-After and a message saying why.
"""

from __future__ import annotations

import time

from appliance.api.rate_limit import Clock, SlidingWindow
from appliance.catalogue.schema import LocalModelSpec
from appliance.errors import ModelNotReadyError, RateLimitedError
from appliance.router import Router
from appliance.settings import OnDemandLimits
from appliance.supervisor.states import ModelState


class LoadRefusedError(ModelNotReadyError):
    """The request would start an on-demand load that is not allowed now."""

    code = "load_refused"


class LoadRateLimitedError(RateLimitedError):
    """Too many on-demand loads started in the last minute."""

    code = "load_rate_limited"


_WOULD_LOAD = (ModelState.UNLOADED, ModelState.SLEEPING)


class LoadGate:
    """Admits or refuses the on-demand loads that requests would start."""

    def __init__(
        self, router: Router, limits: OnDemandLimits, *, clock: Clock = time.monotonic
    ) -> None:
        self._router = router
        self._limits = limits
        self._window = SlidingWindow(limits.loads_per_minute, clock=clock)

    def check(self, model: str, *, may_load: bool) -> None:
        """Raise if a request for ``model`` would start a load it may not start now.

        ``may_load``: whether the caller's key may trigger on-demand loads. A request that
        starts nothing (the model is loaded, loading, remote or not on-demand) always passes.
        """
        if model not in self._router.catalogue:
            return  # the route answers 404
        spec = self._router.catalogue.get(model)
        if not isinstance(spec, LocalModelSpec) or not spec.load_on_demand:
            return
        if self._router.supervisor.get(model).state not in _WOULD_LOAD:
            return
        retry = self._limits.retry_after_seconds
        if not may_load:
            raise LoadRefusedError(
                f"model {model!r} is not loaded, and this API key may not load models on "
                "demand; an operator or a key with may_load can load it",
                retry_after=retry,
            )
        busy = (ModelState.LOADING, ModelState.DOWNLOADING)
        loading = sum(1 for h in self._router.supervisor.handles() if h.state in busy)
        if loading >= self._limits.max_concurrent_loads:
            raise LoadRefusedError(
                f"model {model!r} is not loaded, and {loading} model(s) are loading already, "
                "the most at once; retry when they are ready",
                retry_after=retry,
            )
        wait = self._window.retry_after()
        if wait is not None:
            raise LoadRateLimitedError(
                f"model {model!r} is not loaded, and {self._limits.loads_per_minute} on-demand "
                "loads were started in the last minute, the most allowed",
                retry_after=wait,
            )
        self._window.admit()
