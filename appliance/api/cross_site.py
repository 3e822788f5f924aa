"""Refuse what a web page can make a browser send: the cross-site request guard.

A page opened anywhere on the LAN (or on the box itself) can make its browser send requests to
the appliance. Three checks, before any route or key check runs, stop that:

- **Host allow-list**: a DNS-rebinding page reaches the appliance under its own name; the
  Host header then names a host this box does not answer to (400).
- **Origin**: a browser marks every POST and every cross-origin request with ``Origin``; one
  that is neither this host nor a configured CORS origin is refused (403).
- **JSON only**: a POST with a body must say ``Content-Type: application/json`` (415). A page
  cannot send that cross-site without a CORS preflight, which is refused unless configured.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.error_handlers import appliance_error_response
from appliance.errors import (
    ApplianceError,
    CrossOriginError,
    HostNotAllowedError,
    UnsupportedMediaTypeError,
)

ANY_HOST = "*"


class CrossSiteGuard:
    """Host allow-list, Origin check and JSON-only POSTs, in front of every route."""

    def __init__(
        self, app: ASGIApp, *, allowed_hosts: Iterable[str], cors_origins: Iterable[str] = ()
    ) -> None:
        """``allowed_hosts``: names and addresses a Host header may carry (``*``: any);
        ``cors_origins``: origins (``https://app.example``) whose pages may call the API."""
        self.app = app
        hosts = {host.lower().strip("[]") for host in allowed_hosts}
        self._any_host = ANY_HOST in hosts
        self._hosts = frozenset(hosts)
        self._origins = frozenset(origin.rstrip("/").lower() for origin in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        problem = self._check(scope, headers)
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await appliance_error_response(problem, scope.get("path", ""))(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[bytes, str]) -> ApplianceError | None:
        host = headers.get(b"host", "")
        if not self._any_host and _hostname(host) not in self._hosts:
            # The value is not echoed: it is whatever the page chose.
            return HostNotAllowedError(
                "the Host header names a host this appliance does not answer to (the operator "
                "can add it with --allowed-hosts)"
            )
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_ok(origin, host):
            return CrossOriginError(
                "requests from web pages of other origins are refused (the operator can allow "
                "an origin with --cors-origin)"
            )
        if scope.get("method") == "POST" and _has_body(headers):
            media = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
            json_body = media == "application/json" or media.endswith("+json")
            if not json_body and not _file_upload(scope, headers, media):
                return UnsupportedMediaTypeError(
                    "POST bodies must be JSON, sent with 'Content-Type: application/json'"
                )
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self._origins:
            return True
        # Same origin: the page was served by this appliance (its /docs page, say).
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.lower() != ""


def _headers(scope: Scope) -> dict[bytes, str]:
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):
        if name in (
            b"host",
            b"origin",
            b"content-type",
            b"content-length",
            b"transfer-encoding",
            b"authorization",
        ):
            found.setdefault(name, value.decode("latin-1"))
    return found


UPLOAD_PATHS = frozenset({"/v1/files"})
"""Where a multipart upload (the OpenAI Files API's) is taken."""


def _file_upload(scope: Scope, headers: dict[bytes, str], media: str) -> bool:
    """A multipart upload to the Files API that carries an ``Authorization`` header: a web
    page cannot add that header cross-site without a preflight (which is refused), so a
    form posted by a page elsewhere is still refused."""
    return (
        media == "multipart/form-data"
        and scope.get("path") in UPLOAD_PATHS
        and b"authorization" in headers
    )


def _hostname(host: str) -> str:
    """The name in a Host header, without its port; IPv6 literals without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _has_body(headers: dict[bytes, str]) -> bool:
    if b"transfer-encoding" in headers:
        return True
    length = headers.get(b"content-length", "0").strip()
    return not length.isdigit() or int(length) > 0
