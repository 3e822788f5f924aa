"""The interface every engine offers the rest of the appliance.

Routes and the supervisor talk only to this: a local vLLM engine and a remote backend look the
same from above. Replies carry ready-made bytes so nothing re-serialises a response on its way
out (see the performance issue: no re-encoding of stream chunks).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request


class Endpoint(str, enum.Enum):
    """The OpenAI endpoints an engine may serve."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


MAX_TOKENS_COUNTED = 2**40  # far past any request; a larger count is a backend's garbage


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, when known."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        # Counts may come from a remote backend (untrusted): anything but a sane count is 0,
        # so that it cannot break a request, the metrics (counters refuse negatives) or usage.
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if not _is_count(value):
                object.__setattr__(self, name, 0)

    @classmethod
    def of(cls, usage: object) -> Usage | None:
        """The counts of an OpenAI ``usage`` object; None when it is not an object."""
        if not isinstance(usage, dict):
            return None
        return cls(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def _is_count(value: object) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKENS_COUNTED
    )


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
    """One request to a route of ``vllm serve`` other than the three OpenAI ones above.

    ``route`` is the route as vLLM registers it (``"POST /tokenize"``,
    ``"GET /v1/responses/{response_id}"``); ``path`` and ``query`` are what the client sent, and
    ``body`` its bytes, passed on untouched so the engine validates them as vLLM would.
    """

    route: str
    method: str
    path: str
    query: bytes = b""
    body: bytes = b""
    request_id: str | None = None
    stream: bool = False  # whether the client asked for a stream (``"stream": true``)


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
    """One model's engine, local or remote."""

    async def start(self) -> None:
        """Bring the engine up; raise ``ApplianceError`` (or a subclass) if it cannot start."""
        ...

    async def stop(self) -> None:
        """Shut the engine down and free what it holds; safe to call twice."""
        ...

    async def handle(self, endpoint: Endpoint, body: dict[str, Any], request: Request) -> Reply:
        """Answer one OpenAI request whose JSON body is ``body``."""
        ...

    def routes(self) -> frozenset[str] | None:
        """The routes this engine answers (``"POST /tokenize"``...); None when unknown (a
        remote backend answers for itself)."""
        ...

    async def handle_route(self, call: RouteCall, request: Request) -> Reply:
        """Answer ``call`` as ``vllm serve`` would, status and body alike."""
        ...

    def model_card(self) -> dict[str, Any] | None:
        """What ``vllm serve``'s ``/v1/models`` says of this model (``max_model_len``,
        ``root``, ``parent``...); None when unknown (a remote backend)."""
        ...

    async def sleep(self, level: int) -> None:
        """Free the engine's GPU memory, keeping the engine (vLLM sleep mode)."""
        ...

    async def wake_up(self) -> None:
        """Undo ``sleep``."""
        ...

    def is_alive(self) -> bool:
        """False once the engine has died (process gone, fatal error)."""
        ...

    def stats(self) -> EngineStats:
        """The engine's current load."""
        ...

    def weights_gib(self) -> float | None:
        """Size of the model's weights, for host memory used in sleep; None when unknown."""
        ...

    async def load_adapter(self, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` as ``name`` without stopping the engine."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter ``name``."""
        ...
