"""The owner's side of the control channel: what HTTP workers ask of the model table.

A worker admits a request for a ready local model by itself, on the lending board
(``appliance.supervisor.lending_board``), once it knows the name: what it learns from its
first ``lease`` of it. Anything else it asks for a ``lease``: the owner charges the caller's
key (rate and concurrency), runs the same admission as its own routes (``TableAccess``: key's
model list, load gate, quota, queue limit, load or wake on demand) and answers with how to
reach the engine core (an ``EngineLink``, sent only to a worker that has not got it), which
the worker then talks to itself, and what the worker needs to admit the next request for the
same name alone (the entry's board slot and generation, its queue limit, its names).
``release`` gives a lease back; ``observe`` hands over finished requests' figures, so metrics
and per-key usage are counted once, here. A worker that dies gives back every lease it held.
"""

from __future__ import annotations

import base64
import itertools
import math
import pickle
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request

from appliance.api.auth import ACCESS_SCOPE, KEY_SCOPE, Access, KeyIdentity, key_identity
from appliance.api.model_access import TableAccess
from appliance.api.ollama_routes import keep_alive_in
from appliance.api.request_limits import RequestCost
from appliance.api_keys import AuthConfig
from appliance.engines.base import (
    Endpoint,
    Engine,
    EngineFigureSink,
    EngineStepFigures,
    FinishedRequestTimes,
    Usage,
    link_of,
)
from appliance.engines.remote import DETAIL_SCOPE
from appliance.errors import ApplianceError, RateLimitedError
from appliance.metrics import Metrics
from appliance.request_info import INFO_KEY, RequestInfo, RequestObserver
from appliance.router import Router
from appliance.supervisor.lending_board import KeyLimits
from appliance.supervisor.states import ModelState
from appliance.workers.control import ControlError, WorkerSession
from appliance.workers.scheduler_figures import PeerSnapshots, snapshot_from


def relayed(exc: ApplianceError) -> ControlError:
    """``exc`` as the control channel carries it, for the worker to answer as we would."""
    return ControlError(
        exc.message,
        {
            "status": exc.status_code,
            "type": exc.error_type,
            "code": exc.code,
            "param": exc.param,
            "retry_after": exc.retry_after,
        },
    )


class OwnerService:
    """Answers the workers' calls with the owner's model table, key limits and observers."""

    def __init__(
        self,
        *,
        router: Router,
        access: TableAccess,
        auth: AuthConfig,
        key_limits: Mapping[str, KeyLimits],
        metrics: Metrics,
        observers: Sequence[RequestObserver],
        engine_metrics: EngineFigureSink | None = None,
    ) -> None:
        """``engine_metrics``: where vLLM's per-step figures go (``--engine-metrics``); each
        worker's client gets the steps of its own requests and sends them here."""
        self._router = router
        self._access = access
        self._key_limits = key_limits
        self._identities = {key.name: key_identity(key) for key in auth.keys}
        self._rules = Access(auth)
        self._metrics = metrics
        self._observers = tuple(observers)
        self._leases = itertools.count(1)
        # Engine objects are the identity of a link: a restarted model gets a new engine.
        # Each link is encoded once (its payload holds vLLM's whole config), not per lease.
        self._encoded: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()
        self._links = itertools.count(1)
        # Requests workers have in flight, by entry: running in their own clients of the
        # engine, where this process's client does not see them.
        self._in_workers: Counter[str] = Counter()
        router.supervisor.peer_running = lambda name: self._in_workers[name]
        # The workers' clients' latest scheduler figures (vLLM gives each step's to one client).
        self._peer_snapshots = PeerSnapshots()
        router.supervisor.peer_scheduler = self._peer_snapshots.latest
        self._engine_metrics = engine_metrics
        self._keep_alive = keep_alive_in(router.supervisor)

    def handlers(self) -> dict[str, Any]:
        """The calls a worker may make, for ``ControlServer``."""
        return {
            "lease": self.lease,
            "release": self.release,
            "observe": self.observe,
            "keep_alive": self.keep_alive,
        }

    async def lease(self, session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        """Admit one model request a worker received; lend it the engine's link."""
        model = str(args.get("model", ""))
        target = self._router.target_of(model)
        if target is not None and self._router.supervisor.get(target.entry).local is None:
            # A backend elsewhere: the worker passes the request to us whole (it is
            # network-bound anyway), and our own routes admit it, once. It may remember so.
            return {"proxy": True, "remote": True}
        key = args.get("key")
        identity = self._identities.get(key) if isinstance(key, str) else None
        limits = self._key_limits.get(identity.name) if identity is not None else None
        if limits is not None:
            wait = limits.try_acquire()
            if wait is not None:
                raise relayed(
                    RateLimitedError(f"API key {key!r} is over its rate limit", retry_after=wait)
                )
        request = _request_for(args, identity, self._rules)
        try:
            lease = await self._access.lease(
                request, {"model": model}, _endpoint(args), _cost(args)
            )
        except ApplianceError as exc:
            if limits is not None:
                limits.release()
            raise relayed(exc) from None
        link = link_of(lease.engine)
        if link is None:
            # An engine only this process can reach (started before workers were asked for).
            await lease.release()
            if limits is not None:
                limits.release()
            return {"proxy": True}

        self._in_workers[lease.entry] += 1

        async def release() -> None:
            self._in_workers[lease.entry] -= 1
            try:
                await lease.release()
            finally:
                if limits is not None:
                    limits.release()

        token = str(next(self._leases))
        session.hold(token, release)
        described = self._described(lease.entry, lease.engine, link)
        if described["link_id"] in args.get("held", ()):
            del described["link"]  # the worker has it: tens of kB not sent again
        supervisor = self._router.supervisor
        handle = supervisor.get(lease.entry)
        return {
            "lease": token,
            "model": lease.model,
            **described,
            # Whether errors may name backends and paths to this caller (an admin).
            "detail": bool(request.scope.get(DETAIL_SCOPE)),
            # What the worker needs to admit the next request for this name by itself.
            "names": list(target.names) if target is not None else [model],
            "slot": handle.slot,
            "generation": supervisor.board.generation(handle.slot)
            if handle.slot is not None
            else 0,
            "limit": supervisor.queue_limit(handle),
        }

    async def release(self, session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        """A worker's request is done with its lease."""
        release = session.give_back(str(args.get("lease")))
        if release is not None:
            await release()
        return {}

    async def keep_alive(self, session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        """A worker's request asked its model to stay ``seconds`` once idle (Ollama's
        ``keep_alive``; -1: for good); the worker checked the caller's key, the model's
        ``load_on_demand`` is checked here."""
        seconds = float(args.get("seconds", -1))
        await self._keep_alive(
            str(args.get("entry")), math.inf if seconds < 0 else seconds, bool(args.get("admin"))
        )
        return {}

    async def observe(self, session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        """Count finished requests a worker served, and its streams' inter-token gaps."""
        for done in args.get("requests", ()):
            info = _info_from(done)
            for observer in self._observers:
                observer.on_request_done(info, int(done["status"]), float(done["seconds"]))
        for model, gaps in dict(args.get("gaps", {})).items():
            for gap in gaps:
                self._metrics.observe_inter_token(str(model), float(gap))
        for model, waits in dict(args.get("waits", {})).items():
            for wait in waits:
                self._metrics.observe_queue_wait(str(model), float(wait))
        if self._engine_metrics is not None:
            for model, steps in dict(args.get("steps", {})).items():
                for step in steps:
                    self._engine_metrics.record_engine_step(str(model), step_from(step))
        for entry, sent in dict(args.get("schedulers", {})).items():
            self._offer_snapshot(str(entry), sent)
        return {}

    def _offer_snapshot(self, entry: str, sent: Any) -> None:
        """Keep a worker's scheduler figures of ``entry``'s engine if they are of the engine
        it runs now (not of one a reload replaced) and fresher than those kept."""
        snapshot = snapshot_from(sent) if isinstance(sent, dict) else None
        if snapshot is None:
            return
        try:
            engine = self._router.supervisor.get(entry).engine
        except ApplianceError:
            return  # removed from the catalogue meanwhile
        encoded = self._encoded.get(engine) if engine is not None else None
        if engine is not None and encoded is not None and encoded[0] == sent.get("link_id"):
            self._peer_snapshots.offer(engine, snapshot)

    def links(self) -> list[dict[str, Any]]:
        """Every ready local engine that workers can attach to, as a lease describes it:
        workers attach ahead of their first request (making a vLLM client takes seconds)."""
        found = []
        for handle in self._router.supervisor.handles():
            engine = handle.engine
            if handle.state is not ModelState.READY or engine is None:
                continue
            link = link_of(engine)
            if link is not None:
                found.append(self._described(handle.name, engine, link))
        return found

    def _described(self, entry: str, engine: Engine, link: Any) -> dict[str, Any]:
        """How a worker reaches ``entry``'s engine (``AttachedEngines.get``'s arguments)."""
        encoded = self._encoded.get(engine)
        if encoded is None:
            link_id = str(next(self._links))
            encoded = self._encoded[engine] = (
                link_id,
                base64.b64encode(pickle.dumps(link)).decode(),
            )
        return {
            "entry": entry,
            "link_id": encoded[0],
            "link": encoded[1],
            "adapters": self._router.supervisor.adapters_of(entry),
        }


def step_from(sent: Mapping[str, Any]) -> EngineStepFigures:
    """An engine step's figures as a worker sent them (``dataclasses.asdict``)."""
    fields = dict(sent)
    finished = tuple(FinishedRequestTimes(**done) for done in fields.pop("finished", ()))
    return EngineStepFigures(**fields, finished=finished)


def _endpoint(args: Mapping[str, Any]) -> Endpoint | None:
    value = args.get("endpoint")
    return Endpoint(value) if value is not None else None


def _cost(args: Mapping[str, Any]) -> RequestCost:
    """What the worker's request may cost, as the worker measured it from the body."""
    sequences = args.get("sequences")
    max_tokens = args.get("max_tokens")
    return RequestCost(
        sequences=sequences if isinstance(sequences, int) and sequences > 0 else 1,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
    )


def _peer(args: Mapping[str, Any]) -> tuple[str, int] | None:
    peer = args.get("peer")
    if isinstance(peer, list) and len(peer) == 2:
        return str(peer[0]), int(peer[1])
    return None


def _request_for(args: Mapping[str, Any], identity: KeyIdentity | None, rules: Access) -> Request:
    """A stand-in for the worker's request, carrying what admission reads of it: the key, the
    peer (loopback callers count as admins with no admin key), and its request info."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [],
        "client": _peer(args),
        ACCESS_SCOPE: rules,
        INFO_KEY: RequestInfo(request_id=str(args.get("request_id", ""))),
    }
    if identity is not None:
        scope[KEY_SCOPE] = identity
    return Request(scope)


def _info_from(done: Mapping[str, Any]) -> RequestInfo:
    usage = done.get("usage")
    info = RequestInfo(
        request_id=str(done.get("request_id", "")),
        started=0.0,
        model=done.get("model"),
        endpoint=done.get("endpoint"),
        usage=Usage(int(usage[0]), int(usage[1])) if isinstance(usage, list) else None,
        stream=bool(done.get("stream")),
        first_token_at=done.get("ttft"),
        extra=dict(done.get("extra") or {}),
    )
    return info
