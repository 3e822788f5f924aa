"""How a model route gets its model: admission checks, then the engine, held until released.

Every model route asks a ``ModelAccess`` for a ``Lease``: the name the engine serves the model
under, the engine itself, and a release to call once the answer has gone out. In the process
that owns the model table this is ``TableAccess``: the checks and the supervisor are right
here. An HTTP worker process has another ``ModelAccess`` that asks the owner for the same
lease over the control channel (``appliance.workers``), so limits, queues and loads stay one
set whatever process a request reached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request

from appliance.api.auth import (
    KEY_SCOPE,
    caller_is_admin,
    check_model_allowed,
    may_load_on_demand,
)
from appliance.api.request_limits import RequestCost
from appliance.engines.base import Endpoint, Engine, model_card_of
from appliance.engines.remote import DETAIL_SCOPE
from appliance.errors import (
    ApplianceError,
    InvalidRequestError,
    ModelFailedError,
    RateLimitedError,
)
from appliance.metrics import Metrics
from appliance.request_info import request_info
from appliance.router import Router
from appliance.supervisor.lending_board import KeyLimits

MAX_MODEL_NAME_CHARS = 256

QuotaCheck = Callable[[str | None, int], None]
"""Raises if the key (None: no key) is over its quota, or would be with the tokens given."""


@dataclass
class Lease:
    """A model lent to one request: ``model`` is the name its engine serves it under (an
    alias becomes its model's name), ``entry`` the table entry whose engine and queue it
    uses; ``release`` gives it back (once the answer, or the stream, has gone out).
    ``changed_body``: admission set a field of the request's body the engine must see (the
    key's ``priority``), so the client's own bytes no longer say it all."""

    model: str
    entry: str
    engine: Engine
    release: Callable[[], Awaitable[None]]
    changed_body: bool = False


class ModelAccess(Protocol):
    """Admits a model request and lends it its engine."""

    async def lease(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None,
        cost: RequestCost | None = None,
    ) -> Lease:
        """Check ``body``'s ``model`` may be used by this caller now (with what the request
        may ``cost``: its sequences against the key's rate, their tokens against its quota),
        then borrow its engine for ``endpoint`` (None: any route the engine serves; the route
        checks it). A field it sets in ``body`` it says in the lease (``changed_body``)."""
        ...


def model_of(body: dict[str, Any]) -> str:
    """The body's ``model``, checked: a non-empty string of sane length (else 400)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required and must be a string", param="model")
    if len(model) > MAX_MODEL_NAME_CHARS:
        # Refused before the name reaches the access log, the metrics or an error message.
        raise InvalidRequestError(
            f"'model' is longer than {MAX_MODEL_NAME_CHARS} characters", param="model"
        )
    return model


def admit_model_request(
    request: Request,
    body: dict[str, Any],
    router: Router,
    *,
    check_quota: QuotaCheck | None,
    cost: RequestCost | None = None,
    key_limits: Mapping[str, KeyLimits] | None = None,
) -> tuple[str, str]:
    """What every model route checks before it borrows an engine, for ``body``'s ``model``:
    the caller's key may use it (by any of its names) and is within its quota (whether it
    may start a load it would start, the lending checks: ``Router.engine_for``). Returns
    ``(model, entry)``: the name the engine serves it under (an alias becomes its model's
    name, as ``vllm serve --served-model-name NAME ALIAS`` answers;
    an adapter keeps its own), used for labels, usage and the engine; and the table entry
    whose engine, load gate and queue it uses. An unknown name passes through: the route's
    engine lookup answers 404.

    ``cost``: a request of several sequences takes one slot of its key's requests per minute
    for each (the key check took the first), and the tokens they may generate are checked
    against its quota (``key_limits``: the keys' limits, by name)."""
    info = request_info(request.scope)
    asked = model_of(body)
    info.model = asked
    target = router.target_of(asked)
    check_model_allowed(request.scope, asked, target.names if target else ())
    model = target.served_as if target else asked
    entry = target.entry if target else asked
    info.model = model
    # Remote engines name their backend and quote its errors only to admins.
    request.scope[DETAIL_SCOPE] = caller_is_admin(request.scope)
    cost = cost or RequestCost()
    identity = request.scope.get(KEY_SCOPE)
    key = identity.name if identity is not None else None
    if check_quota is not None:
        check_quota(key, cost.tokens(_context_of(router, entry)))
    limits = key_limits.get(key) if key_limits and key is not None else None
    if limits is not None and cost.sequences > 1:
        _charge_sequences(limits, key, cost.sequences)
    return model, entry


def _charge_sequences(limits: KeyLimits, key: str | None, sequences: int) -> None:
    """Charge a request's other ``sequences - 1`` to its key's requests per minute (the key
    check charged the first), or refuse it: 400 if the whole minute's allowance is too
    small, 429 if what is left is."""
    rate = limits.requests_per_minute
    if rate is None:
        return
    if sequences > rate:
        raise InvalidRequestError(
            f"this request asks for {sequences} sequences (n x prompts), more than API key "
            f"{key!r} may make in a minute ({rate})",
            param="n",
        )
    wait = limits.try_admit_more(sequences - 1)
    if wait is not None:
        raise RateLimitedError(
            f"API key {key!r} is over its rate limit: this request counts as {sequences} "
            "(one per sequence)",
            retry_after=wait,
        )


def _context_of(router: Router, entry: str) -> int | None:
    """The longest sequence ``entry``'s engine runs (its ``max_model_len``), if it is known:
    what a request that sets no ``max_tokens`` may generate at most."""
    with contextlib.suppress(ApplianceError):
        engine = router.supervisor.get(entry).engine
        card = model_card_of(engine)
        length = card.get("max_model_len") if card else None
        if isinstance(length, int) and length > 0:
            return length
    return None


class TableAccess:
    """``ModelAccess`` in the process that owns the model table."""

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        *,
        check_quota: QuotaCheck | None = None,
        key_limits: Mapping[str, KeyLimits] | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._check_quota = check_quota
        self._key_limits = key_limits

    async def lease(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None,
        cost: RequestCost | None = None,
    ) -> Lease:
        """Admit (``admit_model_request``), then borrow the engine from the supervisor (which
        refuses a load on demand this key may not start now)."""
        model, entry = admit_model_request(
            request,
            body,
            self._router,
            check_quota=self._check_quota,
            cost=cost,
            key_limits=self._key_limits,
        )
        held = contextlib.AsyncExitStack()
        asked = time.perf_counter()
        may_load = may_load_on_demand(request.scope)
        try:
            engine = await held.enter_async_context(
                self._router.engine_for(entry, endpoint, may_load=may_load)
                if endpoint is not None
                else self._router.any_engine_for(entry, may_load=may_load)
            )
        except ModelFailedError as exc:
            if caller_is_admin(request.scope):
                raise
            # Why an engine failed names paths and internals: the operator's to read.
            raise ModelFailedError(
                f"model {model!r} failed; the operator can see why in the admin API",
                retry_after=exc.retry_after,
            ) from None
        self._metrics.observe_queue_wait(model, time.perf_counter() - asked)
        return Lease(model=model, entry=entry, engine=engine, release=held.aclose)
