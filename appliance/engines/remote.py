"""Remote backends: catalogue entries with a ``backend_url``, proxied over httpx.

A remote is another appliance, a ``vllm serve`` or TGI's OpenAI API. Requests go to
``{backend_url}/v1/{endpoint}`` with the body as the client sent it; answers come back as the
upstream's bytes (SSE streams chunk by chunk, never re-parsed). Transport failures map to the
appliance's backend errors (503 unreachable, 504 too slow, 502 garbage), and a circuit breaker
per backend stops a dead one from costing every request a connect attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request

from appliance.catalogue.schema import ModelSpec, RemoteModelSpec
from appliance.engines.address_guard import AddressCheck, guarded_transport
from appliance.engines.base import (
    Endpoint,
    EngineStats,
    JSONReply,
    Reply,
    RouteCall,
    StreamReply,
    Usage,
)
from appliance.engines.circuit_breaker import BreakerState, CircuitBreaker
from appliance.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    NotSupportedError,
    envelope,
)

log = logging.getLogger("appliance.remote")


@dataclass(frozen=True)
class RemoteSettings:
    """How the appliance talks to its remote backends."""

    connect_timeout: float = 1.0  # a reachable LAN peer accepts in milliseconds
    read_timeout: float = 60.0  # longest silence between two bytes of a stream
    total_timeout: float = 600.0  # a whole non-streamed answer (long generations are slow)
    write_timeout: float = 10.0
    pool_timeout: float = 5.0  # waiting for a free pooled connection
    max_connections: int = 256
    connect_retries: int = 2  # extra tries after a connect error, and only then
    retry_backoff: float = 0.05  # seconds before the first retry; doubles each time
    failure_threshold: int = 5  # consecutive failures that open the breaker
    cool_down: float = 10.0  # seconds the breaker stays open before one probe may pass
    health_interval: float | None = 5.0  # background health check period; None: no check
    health_timeout: float = 2.0
    api_key_env: str | None = None  # env var holding the Bearer key sent to every backend
    api_key_envs: Mapping[str, str] = field(default_factory=dict)  # per model name, overrides
    max_reply_bytes: int = 256 * 2**20  # a non-streamed answer larger than this is refused


DETAIL_SCOPE = "appliance.backend_detail"
"""ASGI scope key: False when the caller may not see backend URLs and upstream error text
(a user key); the route sets it. Absent: shown (the caller is the operator's own code)."""


def _usage(body: bytes) -> Usage | None:
    """The ``usage`` object of a JSON answer, found from the end (it comes last) for speed."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    rest = body[at + len(b'"usage"') :].lstrip().removeprefix(b":").lstrip()
    try:
        usage, _ = json.JSONDecoder().raw_decode(rest.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # a hostile backend's usage nested past the parser
        return None
    return Usage.of(usage)


async def _shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to the end even when the caller is being cancelled (a client that left).

    Under anyio's level cancellation every await of a cancelled task fails at once, so the
    work runs as its own task. It is used to close upstream responses: closing an unfinished
    one drops the connection, which is what makes vLLM abort the request upstream.
    """
    await asyncio.shield(asyncio.ensure_future(work))


class _Call:
    """One request: counted in flight until settled, and its verdict given to the breaker once."""

    def __init__(self, engine: RemoteEngine) -> None:
        self._engine = engine
        self._settled = False
        engine._in_flight += 1

    def settle(self, ok: bool | None, error: str | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        self._engine._in_flight -= 1
        self._engine._record(ok, error)


class _Relay:
    """The upstream's SSE bytes as they arrive; closing it closes the upstream response.

    A class rather than a generator: ``aclose()`` must close the upstream even when iteration
    never started, which a generator's ``aclose`` would skip.
    """

    def __init__(
        self, engine: RemoteEngine, response: httpx.Response, call: _Call, detail: bool
    ) -> None:
        self._engine = engine
        self._detail = detail
        self._response = response
        self._raw = response.aiter_raw()
        self._call = call
        self._done = False
        self._tail = b"\n\n"  # the last two bytes passed on, to end a cut event cleanly

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._raw.__anext__()
            except StopAsyncIteration:
                await self._finish(True)
                raise
            except httpx.HTTPError as exc:
                # The upstream died mid-stream: the client already has a 200 and some events,
                # so the end is an SSE error event, as vLLM itself ends a failed stream.
                error = self._engine._map(exc, self._detail)
                await self._finish(False, self._engine._map(exc).message)
                event = json.dumps(envelope(error.message, error.error_type, error.code))
                lead = b"" if self._tail == b"\n\n" else b"\n\n"
                return lead + b"data: " + event.encode() + b"\n\n"
            except BaseException:
                await self._finish(None)
                raise
            if chunk:
                self._tail = (self._tail + chunk)[-2:]
                return self._engine.rename(chunk)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early: close the upstream response (the client went away)."""
        await self._finish(None)

    async def _finish(self, ok: bool | None, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._call.settle(ok, error)
        await _shielded(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            await self._raw.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()


class RemoteEngine:
    """One catalogue entry served by another OpenAI-compatible server at ``spec.backend_url``."""

    def __init__(
        self, spec: RemoteModelSpec, client: httpx.AsyncClient, settings: RemoteSettings
    ) -> None:
        self.spec = spec
        self.url = spec.backend_url
        self._client = client
        self._settings = settings
        self._in_flight = 0
        self._healthy: bool | None = None  # the last health check's verdict; None: no check yet
        self._health_path = "/health"
        self._health_task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.breaker = CircuitBreaker(
            settings.failure_threshold, settings.cool_down, on_change=self._breaker_changed
        )
        self.rename = _Rename(spec.upstream_name, spec.name)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background health check, if the settings ask for one."""
        self.start_health_check()

    def start_health_check(self) -> None:
        """Start the health check task (needs a running event loop); idempotent."""
        if self._settings.health_interval is None or self._health_task is not None:
            return
        self._health_task = asyncio.get_running_loop().create_task(
            self._health_loop(), name=f"health {self.spec.name}"
        )

    async def stop(self) -> None:
        """Stop the health check; requests in flight finish on the shared client."""
        task = self._cancel_health_check()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _cancel_health_check(self) -> asyncio.Task[None] | None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
        return task

    @property
    def up(self) -> bool:
        """The breaker is closed and the last health check (if any) passed."""
        return self.breaker.state is BreakerState.CLOSED and self._healthy is not False

    async def sleep(self, level: int) -> None:
        """A remote backend's memory is its own business."""
        raise NotSupportedError(f"model {self.spec.name!r} is remote: sleep it on its own server")

    async def wake_up(self) -> None:
        """See ``sleep``."""
        raise NotSupportedError(f"model {self.spec.name!r} is remote: wake it on its own server")

    def is_alive(self) -> bool:
        """Whether the backend is believed to answer (see ``up``)."""
        return self.up

    def stats(self) -> EngineStats:
        """Requests this appliance has in flight on the backend."""
        return EngineStats(running=self._in_flight)

    def weights_gib(self) -> float | None:
        """Unknown: the weights live on the backend's host."""
        return None

    async def load_adapter(self, name: str, source: str) -> None:
        """A remote backend's adapters are its own business."""
        raise NotSupportedError(f"model {self.spec.name!r} is remote: add adapters on its server")

    async def unload_adapter(self, name: str) -> None:
        """See ``load_adapter``."""
        raise NotSupportedError(f"model {self.spec.name!r} is remote: remove adapters there")

    # -- requests --------------------------------------------------------------------------

    async def handle(self, endpoint: Endpoint, body: dict[str, Any], request: Request) -> Reply:
        """Forward one request; a stream is committed only once the upstream answered 2xx/3xx."""
        if self.spec.backend_model is not None:
            # The backend knows the model by its own name, not by this entry's.
            body = {**body, "model": self.spec.backend_model}
        stream = endpoint is not Endpoint.EMBEDDINGS and bool(body.get("stream"))
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return await self._forward("POST", f"/v1/{endpoint.value}", content, request, stream)

    def model_card(self) -> None:
        """Unknown here: the backend's own ``/v1/models`` has it."""
        return None

    def routes(self) -> None:
        """Unknown: the backend answers for itself which routes it has."""
        return None

    async def handle_route(self, call: RouteCall, request: Request) -> Reply:
        """Pass ``call`` through to the same route of the backend, body untouched; the answer
        is a stream when the backend sends one (``text/event-stream``)."""
        target = call.path + (f"?{call.query.decode('latin-1')}" if call.query else "")
        content = call.body
        if self.spec.backend_model is not None and content:
            content = _with_model(content, self.spec.backend_model)
        return await self._forward(call.method, target, content, request, None, call.stream)

    async def _forward(
        self,
        method: str,
        target: str,
        content: bytes,
        request: Request,
        stream: bool | None,
        asked_stream: bool = False,
    ) -> Reply:
        """Send to ``{backend_url}{target}``; ``stream`` None: a stream if the backend streams
        (``asked_stream``, what the client asked, then only picks the read timeout)."""
        detail = bool(request.scope.get(DETAIL_SCOPE, True))
        wait = self.breaker.admit()
        if wait is not None:
            last = f" (last: {self.last_error})" if detail else ""
            raise BackendUnavailableError(
                f"{self._where(detail)} is unavailable after "
                f"{self.breaker.failures} consecutive failures{last}; retry in {wait:.1f}s",
                retry_after=wait,
            )
        call = _Call(self)
        response: httpx.Response | None = None
        streaming = False  # True once a _Relay owns the open response
        try:
            deadline = time.monotonic() + self._settings.total_timeout
            response = await asyncio.wait_for(
                self._send(method, target, content, request, bool(stream) or asked_stream),
                self._settings.total_timeout,
            )
            if stream is None:
                stream = response.headers.get("content-type", "").startswith("text/event-stream")
            if stream and response.status_code < 400:
                streaming = True
                return StreamReply(chunks=_Relay(self, response, call, detail))
            raw = await asyncio.wait_for(
                self._read_capped(response), max(0.0, deadline - time.monotonic())
            )
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            # A full local pool says nothing about the backend's health.
            ok = None if isinstance(exc, httpx.PoolTimeout) else False
            call.settle(ok, self._map(exc).message)
            raise self._map(exc, detail) from exc
        except BackendError as exc:  # the reply was too large
            call.settle(False, exc.message)
            raise BackendError(
                f"{self._where(detail)} answered more than {self._settings.max_reply_bytes} bytes"
            ) from None
        except BaseException:
            call.settle(None)
            raise
        finally:
            if response is not None and not streaming:
                await _shielded(response.aclose())
        return self._json_reply(response, raw, call, detail)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        """The whole answer, or ``BackendError`` once it passes ``max_reply_bytes``."""
        body = bytearray()
        # Decoded bytes: a compressed answer is capped at the size it unpacks to.
        async for chunk in response.aiter_bytes():
            body.extend(chunk)
            if len(body) > self._settings.max_reply_bytes:
                raise BackendError(f"{self._where(True)} answered too much")
        return bytes(body)

    def _where(self, detail: bool = True) -> str:
        """How messages name the backend: its URL only for those who may see it."""
        if detail:
            return f"model {self.spec.name!r}: backend {self.url}"
        return f"model {self.spec.name!r}: its backend"

    def _json_reply(
        self, response: httpx.Response, raw: bytes, call: _Call, detail: bool = True
    ) -> JSONReply:
        status = response.status_code
        retry_after = response.headers.get("retry-after")
        headers = {"Retry-After": retry_after} if retry_after else {}
        if status >= 400:
            call.settle(status < 500, f"HTTP {status}")
            return JSONReply(*self._error(status, raw, detail), headers=headers)
        if not raw.lstrip().startswith(b"{"):
            call.settle(False, f"{self._where()} answered non-JSON ({status})")
            raise BackendError(f"{self._where(detail)} answered non-JSON ({status})")
        call.settle(True)
        return JSONReply(status, self.rename(raw), usage=_usage(raw), headers=headers)

    def _error(self, status: int, raw: bytes, detail: bool = True) -> tuple[int, bytes]:
        """An upstream error as an OpenAI envelope, rebuilt (never the upstream's bytes).

        An upstream envelope keeps its fields (strings only, the message shortened) and its
        status, so a remote appliance's 503 with Retry-After reaches the client as such.
        Anything else is wrapped: a 4xx keeps its status (the request was at fault) and a 5xx
        becomes 502 (the backend was); its text, cleaned and shortened, is shown only to
        callers who may see the backend (``DETAIL_SCOPE``).
        """
        with contextlib.suppress(ValueError, RecursionError):
            parsed = json.loads(raw)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if isinstance(error, dict):
                return status, json.dumps(_clean_envelope(error, status)).encode()
        text = _printable(raw.decode("utf-8", "replace"), 300) or "no body"
        where = self._where(detail)
        message = f"{where} answered {status}: {text}" if detail else f"{where} answered {status}"
        if status < 500:
            return status, json.dumps(envelope(message, "invalid_request_error", status)).encode()
        return 502, json.dumps(envelope(message, "backend_error", "backend_error")).encode()

    async def _send(
        self, method: str, target: str, content: bytes, request: Request, stream: bool
    ) -> httpx.Response:
        """Send, retrying only a failed connect; the response body is not read yet."""
        s = self._settings
        # A non-streamed answer sends nothing until it is complete, so its read timeout is the
        # total one; a stream must keep bytes coming.
        timeout = httpx.Timeout(
            connect=s.connect_timeout,
            read=s.read_timeout if stream else s.total_timeout,
            write=s.write_timeout,
            pool=s.pool_timeout,
        )
        upstream = self._client.build_request(
            method,
            f"{self.url}{target}",
            content=content if method != "GET" else None,
            headers=self._headers(request.headers.get("x-request-id")),
            timeout=timeout,
        )
        attempt = 0
        while True:
            try:
                return await self._client.send(upstream, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                # Only a failed connect is retried: no byte of the request left this host, so
                # the upstream cannot have started the work. After that (write, read, protocol
                # errors) it may have, and generation is not idempotent (it costs GPU time and
                # samples a different answer), so those are never retried.
                if attempt >= s.connect_retries:
                    raise
                await asyncio.sleep(s.retry_backoff * 2**attempt)
                attempt += 1

    def _headers(self, request_id: str | None) -> dict[str, str]:
        # identity: aiter_raw passes bytes through undecoded, so they must not be compressed.
        # The client's own Authorization is never forwarded: it is a key for this appliance.
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if request_id:
            headers["X-Request-Id"] = request_id
        env = self._settings.api_key_envs.get(self.spec.name, self._settings.api_key_env)
        key = os.environ.get(env) if env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _map(self, exc: BaseException, detail: bool = True) -> BackendError:
        """An httpx failure as the appliance's backend error, naming the model and (with
        ``detail``) the URL and the failure."""
        error = self._map_detailed(exc)
        if detail:
            return error
        # The same class (so the same status), without the URL and the failure's text.
        said = {BackendTimeoutError: "did not answer in time", BackendError: "failed"}
        return type(error)(f"{self._where(False)} {said.get(type(error), 'cannot be reached')}")

    def _map_detailed(self, exc: BaseException) -> BackendError:
        where = self._where()
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendUnavailableError(f"{where} did not accept a connection in time")
        if isinstance(exc, httpx.ConnectError):
            return BackendUnavailableError(f"{where} cannot be reached: {exc}")
        if isinstance(exc, httpx.PoolTimeout):
            return BackendUnavailableError(f"{where}: too many requests in flight to it")
        if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
            return BackendTimeoutError(f"{where} did not answer in time")
        return BackendError(f"{where} failed: {type(exc).__name__}: {exc}")

    def _record(self, ok: bool | None, error: str | None) -> None:
        if ok is True:
            self.breaker.record_success()
            self._healthy = True
        elif ok is False:
            self.last_error = error
            self.breaker.record_failure()
        else:
            self.breaker.release()

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "backend %s: breaker %s -> %s",
            self.url,
            old.value,
            new.value,
            extra={"model": self.spec.name, "event": "breaker", "last_error": self.last_error},
        )

    # -- health ----------------------------------------------------------------------------

    async def check_health(self) -> bool:
        """One check: ``GET /health``, or ``GET /v1/models`` where there is no /health."""
        headers = self._headers(None)
        timeout = self._settings.health_timeout
        try:
            status = await self._health_status(self._health_path, headers, timeout)
            if status in (404, 405) and self._health_path == "/health":
                self._health_path = "/v1/models"  # TGI and vLLM have /health; others may not
                status = await self._health_status(self._health_path, headers, timeout)
            ok = status < 500
            error = None if ok else f"health check: HTTP {status}"
        except httpx.HTTPError as exc:
            ok, error = False, f"health check: {self._map(exc).message}"
        self._healthy = ok
        if ok:
            # A passing check closes an open breaker (it is the probe); it does not reset the
            # count of a closed one, where real requests may still be failing.
            if self.breaker.state is not BreakerState.CLOSED:
                self.breaker.record_success()
        else:
            self.last_error = error
            self.breaker.record_failure()
        return ok

    async def _health_status(self, path: str, headers: dict[str, str], timeout: float) -> int:
        """The status of one health request; its body is never read (it may be anything)."""
        request = self._client.build_request(
            "GET", f"{self.url}{path}", headers=headers, timeout=timeout
        )
        response = await self._client.send(request, stream=True)
        await response.aclose()
        return response.status_code

    async def _health_loop(self) -> None:
        assert self._settings.health_interval is not None
        while True:
            try:
                await self.check_health()
            except Exception:  # a bug here must not end the checks for good
                log.exception("health check of %s failed", self.url)
            await asyncio.sleep(self._settings.health_interval)


def _serves(engine: RemoteEngine, spec: RemoteModelSpec) -> bool:
    """Whether ``engine`` proxies to the same backend and upstream model as ``spec`` says."""
    return engine.url == spec.backend_url and engine.spec.upstream_name == spec.upstream_name


def _with_model(content: bytes, model: str) -> bytes:
    """A JSON body naming ``model`` instead of this entry's name (``backend_model``); a body
    that is not a JSON object with a ``model`` goes on untouched, for the backend to judge."""
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if not isinstance(body, dict) or "model" not in body:
        return content
    return json.dumps({**body, "model": model}, ensure_ascii=False, separators=(",", ":")).encode()


class _Rename:
    """Puts this entry's name where the backend's answer names the model by its own name
    (``backend_model``), as ``vllm serve --served-model-name`` would answer: a bytes
    replacement of the ``"model"`` member, so nothing is re-parsed or re-encoded."""

    def __init__(self, upstream: str, ours: str) -> None:
        self._pairs: list[tuple[bytes, bytes]] = []
        if upstream != ours:
            theirs, mine = json.dumps(upstream).encode(), json.dumps(ours).encode()
            for colon in (b":", b": "):
                self._pairs.append((b'"model"' + colon + theirs, b'"model"' + colon + mine))

    def __call__(self, data: bytes) -> bytes:
        for theirs, mine in self._pairs:
            data = data.replace(theirs, mine)
        return data


def _printable(text: str, limit: int) -> str:
    """``text`` without control characters, at most ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text[: limit * 2]).strip()
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


def _clean_envelope(error: dict[str, Any], status: int) -> dict[str, Any]:
    """An upstream's error envelope rebuilt from its fields, each checked and shortened."""

    def text(value: Any, limit: int) -> str | None:
        return _printable(value, limit) if isinstance(value, str) else None

    code = error.get("code")
    return envelope(
        text(error.get("message"), 1000) or f"the backend answered {status}",
        text(error.get("type"), 64) or "backend_error",
        code if isinstance(code, int) and not isinstance(code, bool) else text(code, 64),
        text(error.get("param"), 128),
    )


class RemoteBackends:
    """Every remote model's engine, sharing one pooled httpx client."""

    def __init__(
        self,
        settings: RemoteSettings | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        guard: AddressCheck | None = None,
    ) -> None:
        """``client``: bring your own (you close it); by default one is made and owned here.
        ``guard``: the address check for untrusted (registry) backends' connections; their
        own client, made here, applies it at every connect."""
        self.settings = settings or RemoteSettings()
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_connections,
            keepalive_expiry=30.0,
        )
        timeout = httpx.Timeout(s.read_timeout, connect=s.connect_timeout)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=timeout, limits=limits)
        self._guarded_client = (
            httpx.AsyncClient(timeout=timeout, transport=guarded_transport(guard, limits))
            if guard is not None
            else None
        )
        self._untrusted = False  # whether the catalogue in force came from the registry
        self._engines: dict[str, RemoteEngine] = {}
        self._started = False

    def _client_for_catalogue(self) -> httpx.AsyncClient:
        if self._untrusted and self._guarded_client is not None:
            return self._guarded_client
        return self._client

    def get(self, spec: RemoteModelSpec) -> RemoteEngine:
        """The engine for ``spec``, made on first use (or anew when its URL changed)."""
        engine = self._engines.get(spec.name)
        client = self._client_for_catalogue()
        if engine is not None and _serves(engine, spec) and engine._client is client:
            return engine
        if engine is not None:
            # A replaced engine's requests in flight finish on the shared client.
            engine._cancel_health_check()
        engine = RemoteEngine(spec, client, self.settings)
        self._engines[spec.name] = engine
        if self._started:
            engine.start_health_check()
        return engine

    async def sync(
        self, specs: Iterable[ModelSpec], *, untrusted: bool = False
    ) -> dict[str, list[str]]:
        """Match the catalogue: add new remote entries, drop removed ones, replace moved ones.

        ``untrusted``: the catalogue came from the registry, so its backends connect through
        the guarded client (engines move to it when this changes)."""
        self._untrusted = untrusted
        wanted = {spec.name: spec for spec in specs if isinstance(spec, RemoteModelSpec)}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "replaced": []}
        for name in sorted(set(self._engines) - set(wanted)):
            await self._engines.pop(name).stop()
            changes["removed"].append(name)
        for name, spec in sorted(wanted.items()):
            old = self._engines.get(name)
            if old is None:
                changes["added"].append(name)
            elif not _serves(old, spec) or old._client is not self._client_for_catalogue():
                await old.stop()
                del self._engines[name]
                changes["replaced"].append(name)
            self.get(spec)
        return changes

    async def start(self) -> None:
        """Start the health checks of every engine, now and as engines are added."""
        self._started = True
        for engine in self._engines.values():
            await engine.start()

    async def close(self) -> None:
        """Stop every engine's health check and close the client if it is ours."""
        self._started = False
        for engine in self._engines.values():
            await engine.stop()
        self._engines.clear()
        if self._owns_client:
            await self._client.aclose()
        if self._guarded_client is not None:
            await self._guarded_client.aclose()

    def health(self, spec: RemoteModelSpec) -> dict[str, Any]:
        """The health of ``spec``'s backend: up, breaker state, the last error."""
        engine = self.get(spec)
        return {
            "up": engine.up,
            "breaker": engine.breaker.state.value,
            "last_error": engine.last_error,
        }

    def status(self) -> dict[str, dict[str, Any]]:
        """Per remote model: backend URL, up, breaker state, last error, requests in flight."""
        return {
            name: {
                "backend_url": engine.url,
                "up": engine.up,
                "breaker": engine.breaker.state.value,
                "last_error": engine.last_error,
                "in_flight": engine.stats().running,
            }
            for name, engine in sorted(self._engines.items())
        }

    def up(self) -> dict[str, bool]:
        """Per remote model: whether its backend is up (``appliance_remote_backend_up``)."""
        return {name: engine.up for name, engine in sorted(self._engines.items())}
