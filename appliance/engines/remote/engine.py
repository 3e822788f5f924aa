"""One remote catalogue entry as an ``Engine``: requests forwarded to its backend over httpx,
a circuit breaker and a health check deciding whether it is up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time

import httpx
from starlette.requests import Request

from appliance.catalogue.schema import RemoteModelSpec
from appliance.engines.base import EngineStats, JSONReply, Reply, RouteCall, StreamReply
from appliance.engines.circuit_breaker import BreakerState, CircuitBreaker
from appliance.engines.remote.envelope import Rename, error_body, with_model
from appliance.engines.remote.relay import Call, Relay, shielded
from appliance.engines.remote.settings import DETAIL_SCOPE, RemoteSettings
from appliance.engines.usage import usage_in_json
from appliance.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
)

log = logging.getLogger("appliance.remote")


class RemoteEngine:
    """One catalogue entry served by another OpenAI-compatible server at ``spec.backend_url``."""

    def __init__(
        self, spec: RemoteModelSpec, client: httpx.AsyncClient, settings: RemoteSettings
    ) -> None:
        self.spec = spec
        self.url = spec.backend_url
        self.client = client  # shared with the other remotes (``RemoteBackends``)
        self._settings = settings
        self._in_flight = 0  # requests on the backend now (``Call``s not yet settled)
        self._healthy: bool | None = None  # the last health check's verdict; None: no check yet
        self._health_path = "/health"
        self._health_task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.breaker = CircuitBreaker(
            settings.failure_threshold, settings.cool_down, on_change=self._breaker_changed
        )
        self.rename = Rename(spec.upstream_name, spec.name)

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
        task = self.cancel_health_check()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cancel_health_check(self) -> asyncio.Task[None] | None:
        """Stop the health check without waiting for it (an engine being replaced)."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
        return task

    @property
    def up(self) -> bool:
        """The breaker is closed and the last health check (if any) passed."""
        return self.breaker.state is BreakerState.CLOSED and self._healthy is not False

    def is_alive(self) -> bool:
        """Whether the backend is believed to answer (see ``up``)."""
        return self.up

    def stats(self) -> EngineStats:
        """Requests this appliance has in flight on the backend."""
        return EngineStats(running=self._in_flight)

    # -- requests --------------------------------------------------------------------------

    def routes(self) -> None:
        """Unknown: the backend answers for itself which routes it has."""
        return None

    async def serve(self, call: RouteCall, request: Request) -> Reply:
        """Pass ``call`` through to the same route of the backend.

        One of the three OpenAI routes with its parsed body is sent as that body and streamed
        as the client asked; a stream is committed only once the upstream answered 2xx/3xx.
        Any other call goes with its bytes untouched, and its answer is a stream when the
        backend sends one (``text/event-stream``).
        """
        target = call.path + (f"?{call.query.decode('latin-1')}" if call.query else "")
        if call.endpoint is not None and call.parsed is not None:
            body = call.parsed
            if self.spec.backend_model is not None:
                # The backend knows the model by its own name, not by this entry's.
                body = {**body, "model": self.spec.backend_model}
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            return await self._forward("POST", target, content, request, call.stream)
        content = call.content()
        if self.spec.backend_model is not None and content:
            content = with_model(content, self.spec.backend_model)
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
        call = Call(self)
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
                return StreamReply(chunks=Relay(self, response, call, detail))
            raw = await asyncio.wait_for(
                self._read_capped(response), max(0.0, deadline - time.monotonic())
            )
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            # A full local pool says nothing about the backend's health.
            ok = None if isinstance(exc, httpx.PoolTimeout) else False
            call.settle(ok, self.map_error(exc).message)
            raise self.map_error(exc, detail) from exc
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
                await shielded(response.aclose())
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
        self, response: httpx.Response, raw: bytes, call: Call, detail: bool = True
    ) -> JSONReply:
        status = response.status_code
        retry_after = response.headers.get("retry-after")
        headers = {"Retry-After": retry_after} if retry_after else {}
        if status >= 400:
            call.settle(status < 500, f"HTTP {status}")
            return JSONReply(*error_body(self._where(detail), status, raw, detail), headers=headers)
        if not raw.lstrip().startswith(b"{"):
            call.settle(False, f"{self._where()} answered non-JSON ({status})")
            raise BackendError(f"{self._where(detail)} answered non-JSON ({status})")
        call.settle(True)
        return JSONReply(status, self.rename(raw), usage=usage_in_json(raw), headers=headers)

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
        upstream = self.client.build_request(
            method,
            f"{self.url}{target}",
            content=content if method != "GET" else None,
            headers=self._headers(request.headers.get("x-request-id")),
            timeout=timeout,
        )
        attempt = 0
        while True:
            try:
                return await self.client.send(upstream, stream=True)
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

    def map_error(self, exc: BaseException, detail: bool = True) -> BackendError:
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

    def enter(self) -> None:
        """Count one more request on the backend (a ``Call`` begins)."""
        self._in_flight += 1

    def leave(self, ok: bool | None, error: str | None) -> None:
        """A request ended: uncount it and give the breaker its verdict (``Call.settle``)."""
        self._in_flight -= 1
        self._record(ok, error)

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
            ok, error = False, f"health check: {self.map_error(exc).message}"
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
        request = self.client.build_request(
            "GET", f"{self.url}{path}", headers=headers, timeout=timeout
        )
        response = await self.client.send(request, stream=True)
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
