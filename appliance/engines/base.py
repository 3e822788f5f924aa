"""The interface every engine offers the rest of the appliance.

Routes and the supervisor talk only to this: a local vLLM engine and a remote backend look the
same from above. Replies carry ready-made bytes so nothing re-serialises a response on its way
out (see the performance issue: no re-encoding of stream chunks).
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request

# Replies carry it; callers may import it from here too.
from appliance.engines.usage import Usage as Usage


class Endpoint(str, enum.Enum):
    """The three OpenAI endpoints, which the appliance parses a little (task check, usage);
    to an engine each is just one more route (``Endpoint.route``)."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"

    @property
    def path(self) -> str:
        """The route's path, ``/v1/chat/completions``."""
        return f"/v1/{self.value}"

    @property
    def route(self) -> str:
        """The route as vLLM registers it, ``"POST /v1/chat/completions"``."""
        return f"POST /v1/{self.value}"


def endpoint_of(route: str) -> Endpoint | None:
    """The OpenAI endpoint ``route`` is (``"POST /v1/completions"``); None for any other."""
    return _ENDPOINT_ROUTES.get(route)


_ENDPOINT_ROUTES = {endpoint.route: endpoint for endpoint in Endpoint}


@dataclass
class JSONReply:
    """A whole JSON answer: the body as bytes, and its status."""

    status_code: int
    body: bytes
    usage: Usage | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamReply:
    """A server-sent-events answer: ``chunks`` yields each event, already encoded.

    ``usage`` is filled in by whoever iterates the stream, when the final usage event shows it.
    """

    chunks: AsyncIterator[bytes]
    usage: Usage | None = None
    headers: dict[str, str] = field(default_factory=dict)


Reply = JSONReply | StreamReply


@dataclass(frozen=True)
class FinishedRequestTimes:
    """Where a finished request spent its time inside the engine, as vLLM measured it."""

    queued: float
    prefill: float
    decode: float
    inference: float
    finish_reason: str


@dataclass(frozen=True)
class EngineStepFigures:
    """What one of vLLM's engine steps reports beyond the gauges of ``EngineStats``.

    Counts are increments since the previous step (vLLM reports them that way).
    """

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    prompt_tokens_cached: int = 0
    spec_decode_drafts: int = 0
    spec_decode_draft_tokens: int = 0
    spec_decode_accepted_tokens: int = 0
    finished: tuple[FinishedRequestTimes, ...] = ()


class EngineFigureSink(Protocol):
    """Takes vLLM's per-step engine figures (``--engine-metrics``); called on every step."""

    def record_engine_step(self, model: str, figures: EngineStepFigures) -> None:
        """Account one engine step of ``model``."""
        ...


@dataclass(frozen=True)
class RouteCall:
    """One request to a route of ``vllm serve``, the three OpenAI ones included.

    ``route`` is the route as vLLM registers it (``"POST /v1/chat/completions"``,
    ``"GET /v1/responses/{response_id}"``); ``path`` and ``query`` are what the client sent, and
    ``body`` its bytes, passed on untouched so the engine validates them as vLLM would.
    ``parsed``: the body as a JSON object, where the caller already has it (the OpenAI routes
    and Ollama's, which build it): an engine may use it instead of parsing ``body`` again, and
    ``body`` may then be empty.
    """

    route: str
    method: str
    path: str
    query: bytes = b""
    body: bytes = b""
    request_id: str | None = None
    stream: bool = False  # whether the client asked for a stream (``"stream": true``)
    parsed: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def of_endpoint(
        cls, endpoint: Endpoint, body: dict[str, Any], request_id: str | None = None
    ) -> RouteCall:
        """A call to one of the three OpenAI routes with its parsed ``body``."""
        stream = endpoint is not Endpoint.EMBEDDINGS and bool(body.get("stream"))
        return cls(
            route=endpoint.route,
            method="POST",
            path=endpoint.path,
            request_id=request_id,
            stream=stream,
            parsed=body,
        )

    @property
    def endpoint(self) -> Endpoint | None:
        """The OpenAI endpoint this call is for; None for any other route."""
        return endpoint_of(self.route)

    def content(self) -> bytes:
        """The body's bytes: ``body``, else ``parsed`` encoded as a compact JSON object."""
        if self.body or self.parsed is None:
            return self.body
        return json.dumps(self.parsed, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SchedulerSnapshot:
    """The scheduler's figures of one engine step, as one client received them, and when
    (``time.monotonic()``: one clock for every process on the host, so the freshest of
    several clients' snapshots is the one with the latest ``at``)."""

    waiting: int
    kv_cache_usage: float
    at: float


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's own load, for metrics and the admin API.

    ``scheduler``: the latest scheduler figures this client received (None: none yet, or not
    a vLLM engine); with several clients, ``waiting`` and ``kv_cache_usage`` stay empty and the
    freshest client's ``scheduler`` fills them (``appliance.supervisor.presenter``).
    """

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None
    scheduler: SchedulerSnapshot | None = None


@dataclass(frozen=True)
class EngineLink:
    """What another process of this appliance needs to become one more client of a local
    engine whose engine cores were started for ``client_count`` client processes.

    The owner (client 0) started the cores; client ``i`` binds ``inputs[i]`` and
    ``outputs[i]`` (ZMQ addresses on this host) and talks to the cores directly, as each API
    process of ``vllm serve --api-server-count N`` does. ``payload`` is opaque here: the
    local engine module writes and reads it (it is a pickle, so a link must only ever come
    from this appliance's own processes, never from the network).
    """

    model: str
    client_count: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    payload: bytes = field(repr=False)


class Engine(Protocol):
    """One model's engine, local or remote: what every engine does.

    What only some engines do is a capability of its own below (``Sleeps``,
    ``TakesAdapters``, ``KnowsWeights``, ``HasModelCard``, ``SharesCores``): callers ask
    ``isinstance(engine, Sleeps)`` instead of catching a refusal.
    """

    async def start(self) -> None:
        """Bring the engine up; raise ``ApplianceError`` (or a subclass) if it cannot start."""
        ...

    async def stop(self) -> None:
        """Shut the engine down and free what it holds; safe to call twice."""
        ...

    async def serve(self, call: RouteCall, request: Request) -> Reply:
        """Answer ``call`` as ``vllm serve`` would, status, body and stream events alike."""
        ...

    def routes(self) -> frozenset[str] | None:
        """The routes this engine answers (``"POST /tokenize"``...); None when unknown (a
        remote backend answers for itself)."""
        ...

    def is_alive(self) -> bool:
        """False once the engine has died (process gone, fatal error)."""
        ...

    def stats(self) -> EngineStats:
        """The engine's current load."""
        ...


@runtime_checkable
class Sleeps(Protocol):
    """An engine that can free its GPU memory and keep running (vLLM sleep mode)."""

    async def sleep(self, level: int) -> None:
        """Free the engine's GPU memory, keeping the engine."""
        ...

    async def wake_up(self) -> None:
        """Undo ``sleep``."""
        ...


@runtime_checkable
class TakesAdapters(Protocol):
    """An engine that loads and unloads LoRA adapters while it runs."""

    async def load_adapter(self, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` as ``name`` without stopping the engine."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter ``name``."""
        ...

    def adapters(self) -> dict[str, str]:
        """The adapters served now: name -> path or hub id."""
        ...


@runtime_checkable
class KnowsWeights(Protocol):
    """An engine whose weights are on this host, so their size is known."""

    def weights_gib(self) -> float | None:
        """Size of the model's weights, for host memory used in sleep; None when unknown."""
        ...


@runtime_checkable
class HasModelCard(Protocol):
    """An engine that knows what ``vllm serve``'s ``/v1/models`` says of its model."""

    def model_card(self) -> dict[str, Any] | None:
        """``max_model_len``, ``root``, ``parent``...; None before the engine started."""
        ...


@runtime_checkable
class SharesCores(Protocol):
    """An engine whose cores other processes of this appliance may attach to as clients."""

    def link(self) -> EngineLink | None:
        """How another process attaches; None with one client, or before the start."""
        ...


def model_card_of(engine: object) -> dict[str, Any] | None:
    """``engine``'s model card, if it has one (None: no engine, or one that cannot say)."""
    return engine.model_card() if isinstance(engine, HasModelCard) else None


def weights_of(engine: object) -> float | None:
    """The size of ``engine``'s weights in GiB, if it knows it (None: no engine, a remote)."""
    return engine.weights_gib() if isinstance(engine, KnowsWeights) else None


def link_of(engine: object) -> EngineLink | None:
    """``engine``'s link for other client processes, if it has one."""
    return engine.link() if isinstance(engine, SharesCores) else None
