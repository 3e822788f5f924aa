"""On-demand loads: who may trigger one, and how many, so no key can make models churn.

A request for a ``load_on_demand`` model that is not loaded starts a load (and maybe evicts
another model to make room). Unchecked, any key could make two such models load and evict
each other in a loop, keeping the GPUs busy with loading. ``LoadGate.check`` runs as the
request is lent its engine (``Router.engine_for``), before a load could start: it refuses keys
that may not load (``may_load: false`` in the keys file), a load while the most loads at once
are running (503), and loads past a per-minute cap (429), each with Retry-After and a message
saying why. It reads the model table only; one gate serves every route and HTTP process (a
worker's leases that could start a load are the owner's).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import ModelNotFoundError, ModelNotReadyError, RateLimitedError
from appliance.supervisor.sliding_window import Clock, SlidingWindow
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.supervisor.supervisor import Supervisor


class OnDemandLimits(BaseModel):
    """How many on-demand loads may run, and start, across the whole appliance."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_loads: int = Field(1, ge=1, description="On-demand loads running at once.")
    loads_per_minute: int = Field(6, ge=1, description="On-demand loads started per minute.")
    retry_after_seconds: float = Field(10.0, gt=0, description="Retry-After when refused.")


class LoadRefusedError(ModelNotReadyError):
    """The request would start an on-demand load that is not allowed now."""

    code = "load_refused"


class LoadRateLimitedError(RateLimitedError):
    """Too many on-demand loads started in the last minute."""

    code = "load_rate_limited"


_WOULD_LOAD = (ModelState.UNLOADED, ModelState.SLEEPING)
_LOADING = (ModelState.LOADING, ModelState.DOWNLOADING)


class LoadGate:
    """Admits or refuses the on-demand loads that requests for ``supervisor``'s entries
    would start."""

    def __init__(
        self, supervisor: Supervisor, limits: OnDemandLimits, *, clock: Clock = time.monotonic
    ) -> None:
        self._supervisor = supervisor
        self._limits = limits
        self._window = SlidingWindow(limits.loads_per_minute, clock=clock)

    def check(self, model: str, *, may_load: bool) -> None:
        """Raise if a request for table entry ``model`` would start a load it may not start
        now.

        ``may_load``: whether the caller's key may trigger on-demand loads. A request that
        starts nothing (the model is loaded, loading, remote or not on-demand) always passes.
        """
        try:
            handle = self._supervisor.get(model)
        except ModelNotFoundError:
            return  # the lending answers 404
        if handle.local is None or not handle.local.load_on_demand:
            return
        if handle.state not in _WOULD_LOAD:
            return
        retry = self._limits.retry_after_seconds
        if not may_load:
            raise LoadRefusedError(
                f"model {model!r} is not loaded, and this API key may not load models on "
                "demand; an operator or a key with may_load can load it",
                retry_after=retry,
            )
        loading = sum(1 for h in self._supervisor.handles() if h.state in _LOADING)
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
