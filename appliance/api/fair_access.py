"""Priorities and fair share in front of each local model's engine.

``FairAccess`` wraps the process's ``ModelAccess``: the inner access admits the request and
lends it its engine (key limits, quota, the model's queue limit, a load); then the request
waits at its model's ``ModelGate`` (``supervisor.fair_queue``) until it is one of the C let
into the engine, C being the entry's ``max_in_engine``, else its engine's ``max_num_seqs``,
else ``FairShareSettings.default_in_engine``. Waiting requests go in order of priority, then
of virtual finish time across keys, each charged ``n x (prompt estimate + max_tokens)``.

With HTTP workers each process has its own gates, each with ``C // K`` places (one at
least): every process orders what reached it, and the kernel spreads connections across the
processes, so a flood's requests queue in every one of them behind the others' share.

The request's priority also goes to vLLM in the body (``priority``) for local models, which
an engine with ``scheduling_policy: priority`` orders its own queue by (and may preempt for).
Metrics, per key and model: ``appliance_key_queue_wait_seconds``, ``appliance_key_admitted``,
``appliance_key_shed``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request

from appliance.api.model_access import Lease, ModelAccess
from appliance.api.priority import key_name, key_weight, request_priority
from appliance.api.request_limits import RequestCost
from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.engines.base import Endpoint
from appliance.errors import ApplianceError, RateLimitedError
from appliance.metrics import KEY_LABEL, QUEUE_BUCKETS, Metrics
from appliance.supervisor.fair_queue import FairShareSettings, ModelGate, QueueTimeoutError
from appliance.supervisor.supervisor import Supervisor

PROMPT_BYTES_PER_TOKEN = 4
"""A prompt's tokens, estimated from its body's size before any tokenizer has seen it."""

VLLM_DEFAULT_PRIORITY = 0
"""The ``priority`` of a vLLM request that names none (its protocol's default)."""

PRIORITY_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/chat/completions/batch",
    }
)
"""Routes whose vLLM request has a ``priority`` field: the appliance sets it there, so a
request that names none still runs at its key's priority in the engine."""

SpecOf = Callable[[str], ModelSpec | None]
"""A table entry's catalogue entry, by entry name (None: not known here)."""


def places_in_engine(spec: ModelSpec | None, settings: FairShareSettings, share: int) -> int | None:
    """How many requests one of ``share`` HTTP processes lets into ``spec``'s engine at once;
    None: no gate (a remote entry, or an unknown one)."""
    if not isinstance(spec, LocalModelSpec):
        return None
    engine_seqs = spec.engine.get("max_num_seqs", spec.engine.get("max-num-seqs"))
    total = spec.max_in_engine or (
        engine_seqs if isinstance(engine_seqs, int) else settings.default_in_engine
    )
    return max(1, total // max(1, share))


class FairShareMetrics:
    """The per-key series of the admission queues (labelled ``key``: the operator's to see)."""

    def __init__(self, registry: CollectorRegistry, model_label: Callable[[Any], str]) -> None:
        labels = [KEY_LABEL, "model"]
        self.wait = Histogram(
            "appliance_key_queue_wait_seconds",
            "Time a key's request waited in its model's admission queue for a place.",
            labels,
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.admitted = Counter(
            "appliance_key_admitted",
            "A key's requests let into their model's engine.",
            labels,
            registry=registry,
        )
        self.shed = Counter(
            "appliance_key_shed",
            "A key's requests refused for load: the model's queue full, or waited too long.",
            labels,
            registry=registry,
        )
        self.label = model_label


class FairAccess:
    """``ModelAccess`` that orders each local model's requests by priority and fair share."""

    def __init__(
        self,
        inner: ModelAccess,
        settings: FairShareSettings,
        *,
        spec_of: SpecOf,
        metrics: FairShareMetrics,
        share: int = 1,
    ) -> None:
        """``spec_of``: each entry's catalogue entry; ``share``: the HTTP processes that
        split each model's places (``appliance up --workers``)."""
        self._inner = inner
        self._settings = settings
        self._spec_of = spec_of
        self._metrics = metrics
        self._share = share
        self._gates: dict[str, ModelGate] = {}

    def _gate(self, entry: str) -> tuple[bool, ModelGate | None]:
        """Whether ``entry`` is a local model here, and its gate (None: none to wait at)."""
        places = places_in_engine(self._spec_of(entry), self._settings, self._share)
        if places is None:
            return False, None
        if not self._settings.enabled:
            return True, None
        gate = self._gates.get(entry)
        if gate is None:
            gate = self._gates[entry] = ModelGate(places, self._settings.max_wait_seconds)
        elif gate.queue.capacity != places:
            gate.resize(places)  # the entry changed (a reload)
        return True, gate

    async def lease(
        self,
        request: Request,
        body: dict[str, Any],
        endpoint: Endpoint | None,
        cost: RequestCost | None = None,
    ) -> Lease:
        """The inner lease, once the request has a place in its model's engine."""
        priority = request_priority(request.scope, body)
        key = key_name(request.scope)
        try:
            lease = await self._inner.lease(request, body, endpoint, cost)
        except RateLimitedError:
            self._metrics.shed.labels(key, self._metrics.label(body.get("model"))).inc()
            raise
        local, gate = self._gate(lease.entry)
        if (
            local
            and request.url.path in PRIORITY_PATHS
            and body.get("priority", VLLM_DEFAULT_PRIORITY) != priority
        ):
            # What vLLM's own queue orders by, if it may. Only when it differs from what vLLM
            # assumes anyway: a body changed for nothing would differ from what vLLM answers to
            # the client's own (a validation error echoes the body it was given).
            body["priority"] = priority
            lease.changed_body = True
        model = self._metrics.label(lease.model)
        if gate is None:
            self._metrics.admitted.labels(key, model).inc()
            return lease
        charge = await self._charge(request, cost or RequestCost())
        asked = time.perf_counter()
        try:
            ticket = await gate.enter(key, priority, charge, key_weight(request.scope))
        except QueueTimeoutError:
            await lease.release()
            self._metrics.shed.labels(key, model).inc()
            raise RateLimitedError(
                f"model {lease.model!r} is busy: this request waited "
                f"{self._settings.max_wait_seconds:g} s for a place; retry shortly",
                retry_after=1,
            ) from None
        except BaseException:
            await lease.release()
            raise
        self._metrics.wait.labels(key, model).observe(time.perf_counter() - asked)
        self._metrics.admitted.labels(key, model).inc()
        inner_release = lease.release

        async def release() -> None:
            gate.leave(ticket)
            await inner_release()

        return dataclasses.replace(lease, release=release)

    async def _charge(self, request: Request, cost: RequestCost) -> float:
        """What the request costs in the fair share: its sequences times its prompt's
        estimated tokens plus the most it may generate."""
        prompt = len(await request.body()) / PROMPT_BYTES_PER_TOKEN
        generated = cost.max_tokens if cost.max_tokens is not None else None
        if generated is None:
            generated = self._settings.unknown_max_tokens
        return cost.sequences * (prompt + generated)


def in_table(supervisor: Supervisor) -> SpecOf:
    """``SpecOf`` for the process that owns the model table."""

    def spec_of(entry: str) -> ModelSpec | None:
        try:
            return supervisor.get(entry).spec
        except ApplianceError:
            return None

    return spec_of


def fair_access_of(
    inner: ModelAccess,
    settings: FairShareSettings,
    metrics: Metrics | None,
    spec_of: SpecOf,
    *,
    share: int = 1,
) -> FairAccess:
    """``inner`` behind priority and fair share, its series on ``metrics``' registry (None:
    a registry of its own, unread: an HTTP worker's)."""
    if metrics is None:
        figures = FairShareMetrics(CollectorRegistry(), lambda name: "")
    else:
        figures = FairShareMetrics(metrics.registry, metrics.model_label)
    return FairAccess(inner, settings, spec_of=spec_of, metrics=figures, share=share)


def in_catalogue_file(specs: Sequence[ModelSpec]) -> SpecOf:
    """``SpecOf`` for an HTTP worker: the entries of the catalogue file it was started with
    (an entry only the registry has gets no gate in a worker)."""
    by_name = {spec.name: spec for spec in specs}
    return by_name.get
