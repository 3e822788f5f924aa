"""The status page: plain HTML, CSS and JavaScript shipped in the package, served at ``/ui``.

No build step and nothing fetched from elsewhere: the browser gets the files in
``appliance/api/static`` as they are. The page holds no data; it reads ``/admin/models``,
``/admin/usage`` and ``/metrics`` (what the CLI reads) with the admin key it asks for once,
sent as ``Authorization: Bearer``. So the files themselves are served ahead of the key check
(a browser cannot send a key when it opens a URL), as plain ASGI in front of the app.
"""

from __future__ import annotations

from importlib import resources

from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.errors import envelope

PAGE_PATH = "/ui"
_ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
}
# The page is the appliance's own: no scripts, styles or frames from anywhere else, and its
# data comes only from this origin.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


def _read_assets() -> dict[str, bytes]:
    folder = resources.files("appliance.api") / "static"
    return {name: (folder / name).read_bytes() for name in _ASSETS}


class StatusPage:
    """Answers GET/HEAD for ``/`` (a redirect), ``/ui`` and ``/ui/<asset>``; passes the rest on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._assets = _read_assets()  # a few kB, read once

    def _response(self, path: str) -> Response | None:
        if path in ("/", PAGE_PATH):
            return RedirectResponse(PAGE_PATH + "/", status_code=307)
        if not path.startswith(PAGE_PATH + "/"):
            return None
        name = path[len(PAGE_PATH) + 1 :] or "index.html"
        body = self._assets.get(name)
        if body is None:
            return JSONResponse(
                envelope(f"no such file: {path}", "not_found_error", "not_found"),
                status_code=404,
            )
        return Response(body, media_type=_ASSETS[name], headers=_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD"):
            response = self._response(scope.get("path", ""))
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
