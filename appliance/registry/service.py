"""The model registry service: the catalogue as a small REST API over a SQLite store.

Reads are open to anyone who can reach the service; writes need ``Authorization: Bearer
<token>``. Every error is answered in the OpenAI error envelope, as the appliance's own API does.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from appliance.api.cross_site import CrossSiteGuard
from appliance.api.error_handlers import register_error_handlers
from appliance.api.peer import local_host_names
from appliance.catalogue.schema import (
    LocalModelSpec,
    ModelSpec,
    parse_model_spec_json,
    untagged_error,
)
from appliance.errors import (
    AuthenticationError,
    BodyTooLargeError,
    InvalidRequestError,
)
from appliance.registry.settings import RegistrySettings
from appliance.registry.store import RegistryEntry, RegistryStore

logger = logging.getLogger("appliance.registry")

# Engine settings that carry credentials (hf_token, api_key, ...): never stored, never served.
_SECRET_WORDS = re.compile(r"(^|[_-])(token|key)$|secret|password|credential", re.IGNORECASE)
# A catalogue entry is a few hundred bytes; anything near this is a mistake, not a model.
MAX_BODY_BYTES = 1024 * 1024


class InvalidJSONError(InvalidRequestError):
    """The request body is not JSON."""

    code = "invalid_json"


class InvalidSpecError(InvalidRequestError):
    """The body is JSON but not a valid catalogue entry."""

    status_code = 422
    code = "invalid_model_spec"


class NameMismatchError(InvalidRequestError):
    """A PUT whose body names another model than its path."""

    code = "name_mismatch"


class RegistryList(BaseModel):
    """The answer to a list request, shaped like OpenAI's lists."""

    object: str = "list"
    data: list[RegistryEntry]


def create_registry_app(settings: RegistrySettings) -> FastAPI:
    """Build the registry service over the database ``settings.db_path`` names.

    When ``settings.token`` is None a random write token is generated once and kept in a
    file beside the database (mode 0600, ``settings.generated_token_path()``), whose path is
    logged; the token itself is never logged. Configure one (``--token-file`` or
    ``APPLIANCE_REGISTRY_TOKEN``) to choose it.
    """
    store = RegistryStore(settings.db_path)
    if settings.token is not None:
        token = settings.token.get_secret_value()
    else:
        path = settings.generated_token_path()
        token = _generated_token(path)
        logger.warning(
            "no registry token configured; writes need the generated one in %s",
            path,
            extra={"event": "registry_token_file"},
        )

    app = FastAPI(
        title="appliance model registry",
        description="The catalogue of models the appliances serve.",
        version="1",
    )
    register_error_handlers(app)
    # As on the appliance's API: a Host that is not this box's is a rebinding page (which
    # would read the catalogue from a LAN browser), and writes from other origins are refused.
    app.add_middleware(
        CrossSiteGuard, allowed_hosts=settings.allowed_hosts or local_host_names(settings.host)
    )
    require_token = _token_checker(token.encode("utf-8"))
    writer = [Depends(require_token)]
    reader: list[Any] = []
    if settings.read_token is not None:
        readers = (settings.read_token.get_secret_value().encode("utf-8"), token.encode("utf-8"))
        reader = [Depends(_token_checker(*readers, what="reads"))]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: the service answers and its database is readable."""
        return {"status": "ok", "models": store.count()}

    @app.get("/v1/registry/models", response_model=RegistryList, dependencies=reader)
    def list_models() -> RegistryList:
        """Every catalogue entry, ordered by name."""
        return RegistryList(data=store.list())

    @app.get("/v1/registry/models/{name:path}", response_model=RegistryEntry, dependencies=reader)
    def get_model(name: str) -> RegistryEntry:
        """One catalogue entry."""
        return store.get(name)

    @app.post(
        "/v1/registry/models",
        status_code=201,
        response_model=RegistryEntry,
        dependencies=writer,
        openapi_extra=_spec_body_doc(),
    )
    async def create_model(request: Request) -> RegistryEntry:
        """Add an entry; 409 if one of that name exists."""
        spec = await _read_spec(request)
        return await run_in_threadpool(store.create, spec)

    @app.put(
        "/v1/registry/models/{name:path}",
        response_model=RegistryEntry,
        dependencies=writer,
        openapi_extra=_spec_body_doc(),
        responses={201: {"description": "Created", "model": RegistryEntry}},
    )
    async def put_model(name: str, request: Request, response: Response) -> RegistryEntry:
        """Create or replace the entry at ``name`` (200 replaced, 201 created)."""
        spec = await _read_spec(request)
        if spec.name != name:
            raise NameMismatchError(
                f"the body names model {spec.name!r} but the path names {name!r}", param="name"
            )
        entry, created = await run_in_threadpool(store.replace, spec)
        response.status_code = 201 if created else 200
        return entry

    @app.delete("/v1/registry/models/{name:path}", status_code=204, dependencies=writer)
    def delete_model(name: str) -> Response:
        """Remove an entry."""
        store.delete(name)
        return Response(status_code=204)

    return app


def _generated_token(path: Path) -> str:
    """The token kept in ``path``, made there (random, mode 0600) if the file is missing."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    # O_EXCL: never write through a file (or link) someone else put there first.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token


def _token_checker(*expected: bytes, what: str = "writes") -> Callable[[Request], None]:
    """A dependency that refuses a request without ``Authorization: Bearer <one of
    expected>``."""

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization")
        if header is None:
            raise AuthenticationError(f"{what} need an Authorization: Bearer <token> header")
        scheme, _, given = header.partition(" ")
        presented = given.strip().encode("utf-8")
        # compare_digest, against every token: the time taken must not reveal how much of a
        # token was right, nor which one.
        matches = [hmac.compare_digest(presented, token) for token in expected]
        if scheme.lower() != "bearer" or not any(matches):
            raise AuthenticationError("the registry token is wrong")

    return require_token


async def _read_spec(request: Request) -> ModelSpec:
    """The body as a ``ModelSpec``, read only after auth passed (hence not a FastAPI body param,
    whose JSON FastAPI parses before any dependency runs)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLargeError(f"the body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise BodyTooLargeError(f"the body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise InvalidJSONError("the body is empty; send a catalogue entry as JSON")
    try:
        spec = parse_model_spec_json(bytes(body))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise InvalidJSONError(f"the body is not valid JSON: {errors[0]['msg']}") from exc
        raise _spec_error(errors) from exc
    engine = spec.engine if isinstance(spec, LocalModelSpec) else {}
    secret = sorted(k for k in engine if _SECRET_WORDS.search(k))
    if secret:
        # Anyone who may read the registry would read them back.
        raise InvalidSpecError(
            f"invalid model entry: engine.{secret[0]}: secrets do not belong in the registry "
            "(set them on the appliance, e.g. HF_TOKEN)",
            param=f"engine.{secret[0]}",
        )
    return spec


def _spec_error(errors: Sequence[Mapping[str, Any]]) -> InvalidSpecError:
    """One error naming every problem pydantic found, and the first field at fault."""
    told = [untagged_error(error) for error in errors]
    problems = []
    for error in told:
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    first = ".".join(str(part) for part in told[0]["loc"]) or None
    return InvalidSpecError("invalid model entry: " + "; ".join(problems), param=first)


def _spec_body_doc() -> dict[str, Any]:
    """OpenAPI text for the body the write routes read themselves."""
    return {
        "requestBody": {
            "required": True,
            "description": "A catalogue entry (the same fields as an entry of models.yaml).",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
