"""ASGI middleware: request id, body-size limit, and one access-log line per request.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through without
buffering, and so the access line is written when the last byte of a stream has gone out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.error_handlers import error_body
from appliance.errors import BodyTimeoutError, BodyTooLargeError
from appliance.logs import request_id_var
from appliance.request_info import INFO_KEY, RequestInfo, RequestObserver

log = logging.getLogger("appliance.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


class RequestContextMiddleware:
    """Request id in and out, body limit, access log, observer call."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        observer: RequestObserver | None = None,
        body_timeout: float | None = None,
    ) -> None:
        """``body_timeout``: longest wait for the next piece of the body before a 408."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = given if given and _VALID_ID.match(given) else uuid.uuid4().hex
        # vLLM takes the request id from this header too, so the engine's logs match ours.
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"x-request-id"]
        headers.append((b"x-request-id", request_id.encode()))
        scope["headers"] = headers
        info = RequestInfo(request_id=request_id)
        scope[INFO_KEY] = info
        token = request_id_var.set(request_id)
        status = 500
        started = False
        id_header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        try:
            too_big = self._declared_too_big(scope)
            if too_big:
                status = 413
                await self._send_error(send, scope, 413, too_big, id_header)
                started = True
            else:
                await self.app(scope, self._limited(receive), send_wrapper)
        except _BodyTooLarge as exc:
            if not started:
                status = 413
                await self._send_error(send, scope, 413, str(exc), id_header)
        except _BodyTooSlow as exc:
            if not started:
                status = 408
                await self._send_error(send, scope, 408, str(exc), id_header)
        except Exception:
            log.exception("unhandled error while serving %s", logged_path(scope.get("path")))
            if not started:
                status = 500
                await self._send_error(
                    send, scope, 500, "internal error; see the appliance's log", id_header
                )
        finally:
            seconds = time.perf_counter() - info.started
            self._log(scope, info, status, seconds)
            if self.observer is not None:
                self.observer.on_request_done(info, status, seconds)
            request_id_var.reset(token)

    def _declared_too_big(self, scope: Scope) -> str | None:
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None
                if length > self.max_body_bytes:
                    return f"request body of {length} bytes is over the {self.max_body_bytes} limit"
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        body_done = False

        async def wrapped() -> Message:
            nonlocal seen, body_done
            if body_done or self.body_timeout is None:
                # After the body, receive() waits for a disconnect for as long as a stream
                # lasts: only the body's pieces are timed.
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:
                    raise _BodyTooSlow(
                        f"the request body stalled for over {self.body_timeout:g}s"
                    ) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _BodyTooLarge(f"request body is over the {self.max_body_bytes} limit")
            return message

        return wrapped

    @staticmethod
    async def _send_error(
        send: Send, scope: Scope, status: int, message: str, id_header: tuple[bytes, bytes]
    ) -> None:
        code = {413: "body_too_large", 408: "body_timeout"}.get(status, "internal_error")
        kind = "invalid_request_error" if status in (408, 413) else "internal_error"
        # In the route family's shape: an Ollama client reads ``{"error": "..."}``.
        shaped = error_body(str(scope.get("path", "")), message, kind, code)
        body = json.dumps(shaped).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    id_header,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: Scope, info: RequestInfo, status: int, seconds: float) -> None:
        # The path once, in its field, and shortened: it is the client's to make long.
        fields: dict[str, Any] = {
            "event": "request",
            "method": scope.get("method"),
            "path": logged_path(scope.get("path")),
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        if info.model is not None:
            fields["model"] = info.model
        if info.stream:
            fields["stream"] = True
        if info.usage is not None:
            fields["prompt_tokens"] = info.usage.prompt_tokens
            fields["completion_tokens"] = info.usage.completion_tokens
        fields.update(info.extra)
        log.info("%s %d", scope.get("method"), status, extra=fields)


MAX_LOGGED_PATH_CHARS = 200
"""Longest request path a log line carries; past it the path is cut and its length said."""


def logged_path(path: object) -> str:
    """``path`` as a log line may carry it: at most ``MAX_LOGGED_PATH_CHARS`` characters."""
    text = str(path)
    if len(text) <= MAX_LOGGED_PATH_CHARS:
        return text
    return f"{text[:MAX_LOGGED_PATH_CHARS]}...({len(text)} chars)"


# ApplianceErrors, so that a route reading the body answers them through the one error
# mapping; the middleware answers them itself when they surface outside a route.
class _BodyTooLarge(BodyTooLargeError):
    """The body grew past the limit while it was read."""


class _BodyTooSlow(BodyTimeoutError):
    """The client stopped sending its body part-way (a slow upload holding a connection)."""
