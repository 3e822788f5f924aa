"""API keys: who may call which routes, with which models, how often.

Keys come from a YAML file (``--api-keys FILE``) and/or the ``APPLIANCE_API_KEYS`` and
``APPLIANCE_ADMIN_KEYS`` environment variables. With no keys at all the API is open, as vLLM
and Ollama are by default; the app says so loudly at start (``describe_open``).

With keys, ``AuthMiddleware`` (plain ASGI, inside the request-context middleware) checks
``Authorization: Bearer <key>`` on every route that is not public: ``/v1`` needs a user or
admin key, ``/admin`` an admin key, and any other path a valid key, so that anonymous callers
cannot map the API by its 404s. It then applies the key's rate limits. The route refuses a
model the key may not use with ``check_model_allowed`` once it has parsed the body.

The key text is never logged nor put in an error message; a key is known by its ``name``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.error_handlers import appliance_error_response
from appliance.api.middleware import INFO_KEY, RequestInfo
from appliance.api.rate_limit import Clock, KeyLimits
from appliance.config_problems import describe, locate
from appliance.errors import (
    ApplianceError,
    AuthenticationError,
    ConfigError,
    ModelNotAllowedError,
    PermissionDeniedError,
    RateLimitedError,
)

log = logging.getLogger("appliance.auth")

KEY_SCOPE = "appliance.key"
"""Where the middleware puts the caller's ``KeyIdentity`` in the ASGI scope."""

USER_KEYS_ENV = "APPLIANCE_API_KEYS"
ADMIN_KEYS_ENV = "APPLIANCE_ADMIN_KEYS"
KEY_MIN_LENGTH = 8
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@:+-]{1,64}$")


class Role(str, enum.Enum):
    """What a key may reach."""

    USER = "user"  # the OpenAI API under /v1
    ADMIN = "admin"  # /v1 and the admin API under /admin


class PublicRoute(str, enum.Enum):
    """Groups of routes that may be made reachable without a key."""

    HEALTH = "health"  # /health and /ready, for load balancers and orchestrators
    METRICS = "metrics"  # /metrics, for Prometheus
    DOCS = "docs"  # /docs, /redoc and /openapi.json


_PUBLIC_PATHS: dict[PublicRoute, frozenset[str]] = {
    PublicRoute.HEALTH: frozenset({"/health", "/ready"}),
    PublicRoute.METRICS: frozenset({"/metrics"}),
    # FastAPI's Swagger page loads its OAuth2 redirect helper from under /docs too.
    PublicRoute.DOCS: frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}),
}


class ApiKey(BaseModel):
    """One API key and what it may do."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=KEY_MIN_LENGTH, description="The secret the client sends.")
    name: str = Field(
        pattern=_NAME_PATTERN.pattern,
        description="Who the key belongs to; written in the access log instead of the key.",
    )
    role: Role = Role.USER
    models: list[str] | None = Field(None, description="Models the key may use; None: all.")
    requests_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)

    @field_validator("key")
    @classmethod
    def _header_safe(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        # The key travels in an HTTP header, where spaces and non-ASCII cannot round-trip.
        if not (text.isascii() and text.isprintable()) or any(c.isspace() for c in text):
            raise ValueError("must be printable ASCII with no spaces")
        return value


def _all_public() -> set[PublicRoute]:
    return set(PublicRoute)


class AuthConfig(BaseModel):
    """The API keys, and which routes need none."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)
    public: set[PublicRoute] = Field(default_factory=_all_public)

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        by_digest: dict[bytes, str] = {}
        names: set[str] = set()
        for entry in self.keys:
            if entry.name in names:
                raise ValueError(f"key {entry.name!r}: the name is used by another key too")
            names.add(entry.name)
            digest = _digest(entry.key.get_secret_value())
            if digest in by_digest:
                raise ValueError(
                    f"key {entry.name!r}: field 'key': same key as {by_digest[digest]!r}"
                )
            by_digest[digest] = entry.name
        return self


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def describe_open(config: AuthConfig) -> str | None:
    """The warning to log at start when no key is configured (the API is open), else None."""
    if config.keys:
        return None
    return (
        "no API keys configured: the API, admin routes included, is open to anyone who can "
        f"reach this port; set {USER_KEYS_ENV} / {ADMIN_KEYS_ENV} or pass --api-keys FILE"
    )


def load_auth_config(path: Path | None, env: Mapping[str, str]) -> AuthConfig:
    """Read the keys from the YAML file at ``path`` (if any) and the environment.

    Keys from ``APPLIANCE_API_KEYS`` (role user) and ``APPLIANCE_ADMIN_KEYS`` (role admin),
    comma-separated, are added to the file's and named ``env-user-1``, ``env-admin-1``, ...
    Raises ``ConfigError`` naming the key's name and field, never the key text.
    """
    raw: dict[str, Any] = {}
    origin = "api keys"
    if path is not None:
        origin = str(path)
        raw = _read_file(path)
    keys = raw.get("keys")
    if keys is None:
        keys = []
    if not isinstance(keys, list):
        raise ConfigError(f"{origin}: 'keys' must be a list")
    for variable, role in ((USER_KEYS_ENV, Role.USER), (ADMIN_KEYS_ENV, Role.ADMIN)):
        given = [part.strip() for part in env.get(variable, "").split(",")]
        for number, key in enumerate((k for k in given if k), start=1):
            keys.append({"key": key, "name": f"env-{role.value}-{number}", "role": role.value})
    raw["keys"] = keys
    try:
        return AuthConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, keys) for error in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file: {exc.strerror}") from None
    if mode & 0o077:
        log.warning(
            "API key file %s can be read by other users (mode %o); chmod 600 it",
            path,
            mode & 0o777,
            extra={"event": "api_keys_file_mode"},
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the position: PyYAML's own message quotes the offending line, maybe a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'keys' list at the top")
    return raw


def _describe(error: Mapping[str, Any], keys: list[Any]) -> str:
    """One validation problem as text; never quotes the input, which may be a key."""
    # A name that is itself invalid may be a pasted key; it is named by its position instead.
    where, loc = locate(
        error, "keys", keys, "key", name_ok=lambda name: bool(_NAME_PATTERN.match(name))
    )
    field = ".".join(str(part) for part in loc)
    if error.get("type") == "too_short" and field == "key":
        # Pydantic counts "items" for a secret; say characters, and not how many were given.
        return f"{where}: field 'key': must be at least {KEY_MIN_LENGTH} characters long"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not field and message.startswith("key "):
        return message  # our own cross-key check, which names the keys itself
    return describe(error, where, loc, show_input=False)


@dataclass(frozen=True)
class KeyIdentity:
    """Who is calling: what the route may know about the caller's key (not the key)."""

    name: str
    role: Role
    models: frozenset[str] | None

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model``."""
        return self.models is None or model in self.models


def check_model_allowed(scope: Scope, model: str) -> None:
    """Raise ``ModelNotAllowedError`` (403) if the caller's key may not use ``model``.

    With no key in ``scope`` (the API is open, or the route is public) every model is allowed.
    """
    identity: KeyIdentity | None = scope.get(KEY_SCOPE)
    if identity is not None and not identity.allows(model):
        raise ModelNotAllowedError(f"this API key may not use model {model!r}", param="model")


@dataclass
class _Entry:
    digest: bytes
    identity: KeyIdentity
    limits: KeyLimits


class AuthMiddleware:
    """Bearer-key check, role check and per-key limits, in front of every non-public route."""

    def __init__(self, app: ASGIApp, *, config: AuthConfig, clock: Clock = time.monotonic) -> None:
        self.app = app
        # Hashed once here: requests are compared by digest, in time independent of the key.
        self._entries = [
            _Entry(
                digest=_digest(key.key.get_secret_value()),
                identity=KeyIdentity(
                    name=key.name,
                    role=key.role,
                    models=frozenset(key.models) if key.models is not None else None,
                ),
                limits=KeyLimits(
                    requests_per_minute=key.requests_per_minute,
                    max_concurrent=key.max_concurrent,
                    clock=clock,
                ),
            )
            for key in config.keys
        ]
        self._public = frozenset().union(*(_PUBLIC_PATHS[route] for route in config.public))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._entries:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path in self._public:
            await self.app(scope, receive, send)
            return
        entry = self._find(scope)
        if entry is None:
            await self._refuse(scope, receive, send, _missing_or_wrong(scope))
            return
        info = scope.get(INFO_KEY)
        if isinstance(info, RequestInfo):
            info.extra["key"] = entry.identity.name
        needed = _needed_role(path)
        if needed is Role.ADMIN and entry.identity.role is not Role.ADMIN:
            await self._refuse(
                scope, receive, send, PermissionDeniedError("this route needs an admin API key")
            )
            return
        wait = entry.limits.try_acquire()
        if wait is not None:
            await self._refuse(
                scope,
                receive,
                send,
                RateLimitedError(
                    f"API key {entry.identity.name!r} is over its rate limit", retry_after=wait
                ),
            )
            return
        scope[KEY_SCOPE] = entry.identity
        try:
            # The slot is held until the inner app returns, i.e. after a stream's last byte.
            await self.app(scope, receive, send)
        finally:
            entry.limits.release()

    def _find(self, scope: Scope) -> _Entry | None:
        presented = _bearer(scope)
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        # Every configured key is compared, with no early exit, so the time taken says
        # nothing about which key (if any) matched.
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ApplianceError) -> None:
        if scope["type"] == "websocket":
            # No HTTP answer is possible before the handshake; 1008 is "policy violation".
            await send({"type": "websocket.close", "code": 1008})
            return
        response = appliance_error_response(exc)
        if isinstance(exc, AuthenticationError):
            response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _missing_or_wrong(scope: Scope) -> AuthenticationError:
    if _bearer(scope) is None:
        return AuthenticationError(
            "this API needs a key: send it as an 'Authorization: Bearer <key>' header"
        )
    return AuthenticationError("the API key is not valid")


def _needed_role(path: str) -> Role | None:
    """The role a path needs: admin for /admin, user for /v1, None (any key) for the rest."""
    # Repeated slashes are collapsed so that "//admin" cannot pass as a non-admin path.
    parts = [part for part in path.split("/") if part]
    first = parts[0] if parts else ""
    if first == "admin":
        return Role.ADMIN
    if first == "v1":
        return Role.USER
    return None


def model_allowed(scope: Scope, model: str) -> bool:
    """True when the request's key (if any) may use ``model``."""
    identity = scope.get(KEY_SCOPE)
    return identity is None or identity.allows(model)
