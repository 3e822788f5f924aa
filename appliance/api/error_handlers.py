"""Every error leaves the appliance in the OpenAI error envelope, mapped here and only here.

``{"error": {"message", "type", "param", "code"}}``, with Retry-After on 429/503 answers;
under Ollama's ``/api/`` the same error in Ollama's shape, ``{"error": "message"}``.
A client mistake is always a 4xx; an unexpected exception is logged and answered 500.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError, AuthenticationError, envelope

log = logging.getLogger("appliance.api")


OLLAMA_PREFIX = "/api/"


def error_body(
    path: str, message: str, error_type: str, code: str | int | None, param: str | None = None
) -> dict[str, object]:
    """The error body for a request to ``path``: Ollama's shape under ``/api/``, else the
    OpenAI envelope (the middleware's own refusals use it too: 413, 408, 500)."""
    if path.startswith(OLLAMA_PREFIX):
        return {"error": message}
    return envelope(message, error_type, code, param)


def appliance_error_response(exc: ApplianceError, path: str = "") -> JSONResponse:
    """The HTTP answer for one of the appliance's own errors (to a request for ``path``)."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif exc.status_code in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(
        error_body(path, exc.message, exc.error_type, exc.code, exc.param),
        status_code=exc.status_code,
        headers=headers,
    )


async def _appliance_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApplianceError)
    return appliance_error_response(exc, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = first.get("msg", "invalid request")
    return JSONResponse(
        error_body(
            request.url.path,
            f"{param}: {message}" if param else message,
            "invalid_request_error",
            "invalid_request",
            param,
        ),
        status_code=400,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # Starlette's own refusals: unknown route (404), wrong method (405).
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(request.url.path, str(exc.detail), error_type, code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error: %r", exc, exc_info=exc)
    return JSONResponse(
        error_body(
            request.url.path,
            "internal error; see the appliance's log",
            "internal_error",
            "internal_error",
        ),
        status_code=500,
    )


def register_error_handlers(app: FastAPI) -> None:
    """Install the mapping above on ``app``."""
    app.add_exception_handler(ApplianceError, _appliance_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
