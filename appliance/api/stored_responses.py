"""Stored responses of the Responses API: whose each one is, and how many are kept, how long.

With ``VLLM_ENABLE_RESPONSES_API_STORE=1`` vLLM keeps every response in its serving layer
under the id the request named (``request_id``), for anyone who knows the id, for ever. Here
every stored response has an owner, the key that made it (or the anonymous caller): the
appliance names the id itself (a client's ``request_id`` is replaced, so no client can name
or overwrite another's record), remembers whose it is, and answers 404, as for an unknown id,
to anyone else who reads it, cancels it or continues from it (``previous_response_id``). The
oldest are forgotten past a count (in all, and per key) or an age, in this table and in the
engine's store.

Every stored response lives in the owner process: an HTTP worker passes a request that
stores or reads one to the owner (``keeps_stored_response``), and the owner answers every
``GET /v1/responses/{id}``, so a response is readable whichever worker took the connection.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from appliance.api.auth import KEY_SCOPE
from appliance.errors import ApplianceError
from appliance.router import Router
from appliance.settings import StoredResponseLimits
from appliance.supervisor.sliding_window import Clock

STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
RESPONSES_PATH = "/v1/responses"
ANONYMOUS = ""
"""The owner of responses made without a key."""


def store_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether vLLM keeps responses (it reads the same variable, as an int)."""
    try:
        return bool(int(env.get(STORE_ENV, "0") or "0"))
    except ValueError:
        return False


def keeps_stored_response(path: str, body: dict[str, Any]) -> bool:
    """Whether a request to ``path`` stores a response or reads a stored one (so the owner
    process, which holds the store, must answer it)."""
    if path != RESPONSES_PATH:
        return False
    return body.get("store", True) is not False or body.get("previous_response_id") is not None


class ResponseNotFoundError(ApplianceError):
    """No stored response with that id that this caller may see (vLLM's 404, word for word)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


def not_found(response_id: str, param: str = "response_id") -> ResponseNotFoundError:
    """The 404 for ``response_id``: the same whether it does not exist or is another's."""
    return ResponseNotFoundError(f"Response with id '{response_id}' not found.", param=param)


def caller_of(scope: Scope) -> str:
    """Who owns what the request stores: its key's name, or the anonymous caller."""
    identity = scope.get(KEY_SCOPE)
    return identity.name if identity is not None else ANONYMOUS


@dataclass
class _Stored:
    owner: str
    entry: str  # the table entry whose engine holds it
    at: float


Forget = Callable[[str, list[str]], None]
"""Drops stored responses (by id) from the engine of a table entry."""


class ResponseOwners:
    """The owner process's table of stored responses: id -> owner, entry, when."""

    def __init__(
        self, limits: StoredResponseLimits, forget: Forget, *, clock: Clock = time.monotonic
    ) -> None:
        self._limits = limits
        self._forget = forget
        self._clock = clock
        self._stored: OrderedDict[str, _Stored] = OrderedDict()  # oldest first
        self._per_owner: defaultdict[str, int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self._stored)

    def new_id(self) -> str:
        """A fresh id for a response to store (vLLM's own form: ``resp_`` and a uuid)."""
        return f"resp_{uuid.uuid4().hex}"

    def check(self, response_id: str, caller: str, param: str = "response_id") -> str:
        """The entry holding ``response_id`` if ``caller`` owns it; else ``not_found``."""
        self.expire()
        stored = self._stored.get(response_id)
        if stored is None or stored.owner != caller:
            raise not_found(response_id, param)
        return stored.entry

    def add(self, response_id: str, caller: str, entry: str) -> None:
        """Remember that ``caller`` stored ``response_id`` in ``entry``'s engine; forget the
        oldest past the limits (the caller's own first, past its per-key count)."""
        self.expire()
        self._stored[response_id] = _Stored(owner=caller, entry=entry, at=self._clock())
        self._per_owner[caller] += 1
        if self._per_owner[caller] > self._limits.max_per_key:
            oldest = next(i for i, s in self._stored.items() if s.owner == caller)
            self._drop([oldest])
        if len(self._stored) > self._limits.max_stored:
            self._drop(list(self._stored)[: len(self._stored) - self._limits.max_stored])

    def discard(self, response_id: str) -> None:
        """Forget ``response_id`` (its request failed: nothing was stored under it)."""
        self._drop([response_id])

    def expire(self) -> None:
        """Forget the responses older than the age limit."""
        cutoff = self._clock() - self._limits.max_age_seconds
        old = []
        for response_id, stored in self._stored.items():
            if stored.at > cutoff:
                break  # in insertion order: the rest are younger
            old.append(response_id)
        if old:
            self._drop(old)

    def _drop(self, ids: Iterable[str]) -> None:
        by_entry: defaultdict[str, list[str]] = defaultdict(list)
        for response_id in ids:
            stored = self._stored.pop(response_id, None)
            if stored is None:
                continue
            self._per_owner[stored.owner] -= 1
            if not self._per_owner[stored.owner]:
                del self._per_owner[stored.owner]
            by_entry[stored.entry].append(response_id)
        for entry, dropped in by_entry.items():
            self._forget(entry, dropped)


def forget_in_table(router: Router) -> Forget:
    """A ``Forget`` that drops responses from the engine of ``router``'s table entry (an
    entry gone or stopped holds nothing any more)."""

    def forget(entry: str, ids: list[str]) -> None:
        try:
            engine = router.supervisor.get(entry).engine
        except ApplianceError:
            return
        drop = getattr(engine, "forget_responses", None)
        if callable(drop):
            drop(ids)

    return forget
