"""A request's priority: its key's, or what its body asks within the key's bounds.

Lower is served earlier, as in vLLM (``priority`` in a request, ``scheduling_policy:
priority`` on an engine). A key's priority and the range a request may ask for come from the
keys file (``priority``, ``priority_range``); a caller without a key may lower its requests,
never raise them past 0. Batch lines (``BATCH_SCOPE``, set only by the appliance's own batch
runner: no client can set an ASGI scope entry) run at the least urgent priority.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from appliance.api.auth import KEY_SCOPE, KeyIdentity
from appliance.api_keys import PRIORITY_LAST
from appliance.batches.settings import BATCH_SCOPE
from appliance.errors import InvalidRequestError

_ANONYMOUS_BOUNDS = (0, PRIORITY_LAST)


def request_priority(scope: Scope, body: dict[str, Any]) -> int:
    """The priority ``body`` runs at for the caller in ``scope``; 400 for a ``priority`` that
    is not an integer or lies outside what the caller's key may ask for."""
    if scope.get(BATCH_SCOPE):
        return PRIORITY_LAST
    identity: KeyIdentity | None = scope.get(KEY_SCOPE)
    default = identity.priority if identity is not None else 0
    asked = body.get("priority")
    if asked is None:
        return default
    if isinstance(asked, bool) or not isinstance(asked, int):
        raise InvalidRequestError("'priority' must be an integer", param="priority")
    first, last = identity.priority_bounds if identity is not None else _ANONYMOUS_BOUNDS
    if not first <= asked <= last:
        who = f"API key {identity.name!r}" if identity is not None else "a caller without a key"
        raise InvalidRequestError(
            f"'priority' {asked} is outside what {who} may ask for: {first} (most urgent) "
            f"to {last} (least urgent)",
            param="priority",
        )
    return asked


def key_weight(scope: Scope) -> float:
    """The caller's share of a busy model against keys of equal priority."""
    identity: KeyIdentity | None = scope.get(KEY_SCOPE)
    return identity.weight if identity is not None else 1.0


def key_name(scope: Scope) -> str:
    """The caller's key name ("" without a key): whose fair share a request counts in."""
    identity: KeyIdentity | None = scope.get(KEY_SCOPE)
    return identity.name if identity is not None else ""
