"""How a worker gets a model for a request: admitted here on the lending board when it can
be, else leased from the owner over the control channel (``appliance.workers.owner``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from fastapi import Request

from appliance.api.auth import (
    KEY_SCOPE,
    caller_is_admin,
    check_model_allowed,
)
from appliance.api.model_access import Lease, model_of
from appliance.api.request_limits import RequestCost
from appliance.api.stored_responses import keeps_stored_response
from appliance.engines.base import Endpoint
from appliance.engines.remote import DETAIL_SCOPE
from appliance.errors import ApplianceError, ModelNotAllowedError, OwnerUnavailableError
from appliance.request_info import request_info
from appliance.supervisor.lending_board import KeyLimits, LendingBoard
from appliance.workers.attached_engines import AttachedEngines, LinkMissing
from appliance.workers.control import ControlClient, ControlError
from appliance.workers.figures_to_owner import FiguresToOwner
from appliance.workers.proxy import BODY_SCOPE

log = logging.getLogger("appliance")


class RelayedError(ApplianceError):
    """An error the owner raised, answered here as the owner would have."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message, param=detail.get("param"), retry_after=detail.get("retry_after"))
        self.status_code = int(detail.get("status", 500))
        self.error_type = str(detail.get("type", "internal_error"))
        self.code = str(detail.get("code", "internal_error"))


def relayed_error(exc: ControlError) -> ApplianceError:
    """The client's error for a call the owner did not answer: an ``ApplianceError`` the owner
    raised (it carries a status) as the owner would answer it; anything else (the channel
    gone, a failure inside the owner) a 503 that names no internals, logged here."""
    if "status" in exc.detail:
        return RelayedError(str(exc), exc.detail)
    log.warning("the owner did not answer a lease: %s", exc, extra={"event": "owner_call"})
    return OwnerUnavailableError(
        "the appliance could not admit this request just now; retry", retry_after=1.0
    )


class PassToOwner(Exception):
    """The model is not served by an engine this worker can reach: the owner answers."""


async def pass_to_owner(request: Request) -> NoReturn:
    """Give ``request`` to the owner (its body read here, kept for the owner to read)."""
    request.scope[BODY_SCOPE] = await request.body()
    raise PassToOwner


async def owner_chooses_model(request: Request, route: str) -> str:
    """``DefaultModel`` in a worker: only the owner sees the whole table, so a body that
    names no model is the owner's to answer."""
    await pass_to_owner(request)


@dataclass(frozen=True)
class KnownName:
    """What a worker learnt of a requested name from the owner's lease, to admit the next
    request for it by itself (valid while the board's table generation stays the same)."""

    model: str  # the name its engine serves it under
    entry: str
    names: tuple[str, ...]  # the names a key may list to be allowed it
    link_id: str | None  # None: a remote entry, which the owner answers
    slot: int | None
    generation: int
    limit: int


class WorkerAccess:
    """``ModelAccess`` in an HTTP worker: a ready local model it knows is admitted here, on
    the lending board; anything else the owner admits and lends. The engine is ours."""

    def __init__(
        self,
        control: ControlClient,
        engines: AttachedEngines,
        *,
        board: LendingBoard,
        key_limits: Mapping[str, KeyLimits],
        quota_keys: frozenset[str],
        figures: FiguresToOwner,
        stored_to_owner: bool = False,
    ) -> None:
        """``key_limits``: each key's limits on ``board``; ``quota_keys``: keys with a token
        quota, always admitted by the owner (their usage is counted there);
        ``stored_to_owner``: pass the requests that store or read a stored response to the
        owner, which holds them all (``api.stored_responses``)."""
        self._stored_to_owner = stored_to_owner
        self._control = control
        self._engines = engines
        self._board = board
        self._key_limits = key_limits
        self._quota_keys = quota_keys
        self._figures = figures
        # By name and route: the owner's lease checked that the entry serves that route.
        self._known: dict[tuple[str, Endpoint | None], KnownName] = {}
        self._table_generation = board.table_generation

    async def lease(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None,
        cost: RequestCost | None = None,
    ) -> Lease:
        """Admit ``body``'s model here if the board allows it, else ask the owner (``cost``:
        what the request may cost, which the owner charges to the key)."""
        cost = cost or RequestCost()
        if self._stored_to_owner and keeps_stored_response(request.url.path, body):
            await self._pass_to_owner(request)
        info = request_info(request.scope)
        info.model = asked = model_of(body)
        if self._board.table_generation != self._table_generation:
            # Names, aliases or adapters changed: what we learnt may be wrong now.
            self._table_generation = self._board.table_generation
            self._known.clear()
        known = self._known.get((asked, endpoint))
        if known is not None:
            if known.link_id is None:
                await self._pass_to_owner(request)
            # A request of several sequences is charged more of its key's rate: the owner's.
            lease = self._lend_here(request, asked, known) if cost.sequences == 1 else None
            if lease is not None:
                return lease
        return await self._lease_from_owner(request, asked, endpoint, cost)

    def _lend_here(self, request: Request, asked: str, known: KnownName) -> Lease | None:
        """The owner's admission of a request for a ready local model, done here: the key's
        model list, then the entry still lent under the same engine, its queue and the key's
        limits, all charged at once on the board. None: ask the owner (who words any
        refusal, waits for loads, and charges nothing twice: nothing was charged here)."""
        identity = request.scope.get(KEY_SCOPE)
        if identity is not None and identity.name in self._quota_keys:
            return None
        if known.slot is None or known.link_id is None:
            return None
        engine = self._engines.attached(known.link_id)
        if engine is None or not engine.is_alive():
            return None
        try:
            check_model_allowed(request.scope, asked, known.names)
        except ModelNotAllowedError:
            return None  # the owner refuses it, charging the key as it does
        limits = self._key_limits.get(identity.name) if identity is not None else None
        slot = known.slot
        if not self._board.lend(slot, known.generation, known.limit, limits):
            return None
        info = request_info(request.scope)
        info.model = known.model
        # Remote engines name their backend and quote its errors only to admins.
        request.scope[DETAIL_SCOPE] = caller_is_admin(request.scope)
        self._figures.observe_queue_wait(known.model, 0.0)

        async def release() -> None:
            self._board.give_back(slot, limits)

        return Lease(model=known.model, entry=known.entry, engine=engine, release=release)

    async def _pass_to_owner(self, request: Request) -> NoReturn:
        await pass_to_owner(request)

    async def _lease_from_owner(
        self, request: Request, asked: str, endpoint: Endpoint | None, cost: RequestCost
    ) -> Lease:
        """Ask the owner for a lease on ``asked``; attach to its engine if new."""
        info = request_info(request.scope)
        identity = request.scope.get(KEY_SCOPE)
        client = request.scope.get("client")
        held = self._engines.held()
        for _ in range(2):
            try:
                got = await self._control.call(
                    "lease",
                    model=asked,
                    key=identity.name if identity is not None else None,
                    peer=list(client) if client else None,
                    endpoint=endpoint.value if endpoint is not None else None,
                    request_id=info.request_id,
                    held=held,
                    sequences=cost.sequences,
                    max_tokens=cost.max_tokens,
                )
            except ControlError as exc:
                raise relayed_error(exc) from None
            if got.get("proxy"):
                if got.get("remote"):
                    self._known[asked, endpoint] = KnownName(asked, asked, (), None, None, 0, 0)
                await self._pass_to_owner(request)
            token = str(got["lease"])

            async def release(token: str = token) -> None:
                with contextlib.suppress(ControlError):
                    await self._control.call("release", lease=token)

            try:
                engine = await self._engines.get(
                    str(got["entry"]), str(got["link_id"]), got.get("link"), dict(got["adapters"])
                )
            except LinkMissing:
                await release()
                held = []  # closed since we said we had it: ask once more, for the link
                continue
            except BaseException:
                await release()
                raise
            break
        else:
            raise RelayedError("the engine link could not be had; retry", {"status": 503})
        info.model = str(got["model"])
        request.scope[DETAIL_SCOPE] = bool(got.get("detail"))
        slot = got.get("slot")
        self._known[asked, endpoint] = KnownName(
            model=info.model,
            entry=str(got["entry"]),
            names=tuple(got.get("names", ())),
            link_id=str(got["link_id"]),
            slot=int(slot) if slot is not None else None,
            generation=int(got.get("generation", 0)),
            limit=int(got.get("limit", 0)),
        )
        return Lease(model=info.model, entry=str(got["entry"]), engine=engine, release=release)
