"""``GET /docs``: the API's routes as one HTML page, made here, with no script in it.

FastAPI's own ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a CDN. On this origin
that hands a third party's script the status page's storage, where an admin key is kept for
the session: whoever serves (or takes over) that CDN file could read it. So the page is
rendered on the server from the OpenAPI schema (``/openapi.json`` stays, for tools that
want it), and answered with a Content-Security-Policy that lets no script run at all.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DOCS_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""No script, no fetch, no frame: the page is text and one inline style sheet."""

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
.route { margin: .6rem 0; }
.method { display: inline-block; min-width: 4.5rem; font: bold 13px monospace; }
code { font-size: 14px; }
.about { color: #555; margin: .1rem 0 0 4.5rem; }
"""


def render_docs(schema: dict[str, Any]) -> str:
    """The HTML page of an OpenAPI ``schema``: its routes grouped by tag, with summaries."""
    info = schema.get("info", {})
    by_tag: dict[str, list[str]] = {}
    for path, operations in sorted(schema.get("paths", {}).items()):
        for method, operation in operations.items():
            tag = (operation.get("tags") or ["Other"])[0]
            about = operation.get("description") or ""
            by_tag.setdefault(tag, []).append(
                '<div class="route">'
                f'<span class="method">{html.escape(method.upper())}</span>'
                f"<code>{html.escape(path)}</code> {html.escape(operation.get('summary', ''))}"
                + (f'<div class="about">{html.escape(about)}</div>' if about else "")
                + "</div>"
            )
    sections = "".join(
        f"<h2>{html.escape(tag)}</h2>{''.join(routes)}" for tag, routes in by_tag.items()
    )
    title = html.escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1><p>{html.escape(info.get('description', ''))} "
        "The machine-readable schema is at <code>/openapi.json</code>.</p>"
        f"{sections}</body></html>"
    )


def build_docs_router(schema: Callable[[], dict[str, Any]]) -> APIRouter:
    """``/docs``, from ``schema`` (the app's ``openapi`` method), built on each request."""
    api = APIRouter(tags=["Docs"])

    @api.get("/docs", summary="API documentation", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The routes of this API, as a page with no script."""
        return HTMLResponse(
            render_docs(schema()),
            headers={"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff"},
        )

    return api
