"""API keys: who may call which routes, with which models, how often.

Keys come from a YAML file or the environment (``appliance.api.auth_file``).

``AuthMiddleware`` (plain ASGI, inside the request-context middleware) checks
``Authorization: Bearer <key>`` on every route that is not public: ``/v1`` needs a user or
admin key, ``/admin`` an admin key, and any other path a valid key, so that anonymous callers
cannot map the API by its 404s. It then applies the key's rate limits. The routers carry their
role too (``require_role``), so a mount or ``root_path`` that moves a route keeps its role.
The route refuses a model the key may not use with ``check_model_allowed`` once it has parsed
the body.

Without a key a caller is anonymous (``Access.anonymous_allowed``): the admin API answers
anonymous callers only on loopback, and only while no admin key exists; ``/v1`` answers them
only on loopback while no key exists at all, or from anywhere if the operator opened it
(``anonymous: true`` in the keys file, ``appliance up --allow-anonymous``). The app announces
what is open at start (``describe_open``).

The key text is never logged nor put in an error message; a key is known by its ``name``.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.auth_backoff import AuthBackoff, client_of
from appliance.api.error_handlers import appliance_error_response
from appliance.api.peer import is_loopback, peer_address
from appliance.api_keys import (
    PRIORITY_LAST,
    ApiKey,
    AuthConfig,
    PublicRoute,
    Role,
    key_digest,
)
from appliance.engines.route_table import is_model_route
from appliance.errors import (
    ApplianceError,
    AuthenticationError,
    ModelNotAllowedError,
    PermissionDeniedError,
    RateLimitedError,
)
from appliance.request_info import INFO_KEY, RequestInfo
from appliance.supervisor.lending_board import KeyLimits, LendingBoard
from appliance.supervisor.sliding_window import Clock

log = logging.getLogger("appliance.auth")

KEY_SCOPE = "appliance.key"
"""Where the middleware puts the caller's ``KeyIdentity`` in the ASGI scope."""
ACCESS_SCOPE = "appliance.access"
"""Where the middleware puts its ``Access`` policy, for the routes' role checks."""
SCRAPER_SCOPE = "appliance.scraper"
"""Set (True) by the middleware on a ``/metrics`` request from a ``metrics_from`` network:
the operator's own Prometheus, which sees what an admin sees."""

_PUBLIC_PATHS: dict[PublicRoute, frozenset[str]] = {
    PublicRoute.HEALTH: frozenset({"/health", "/ready"}),
    PublicRoute.METRICS: frozenset({"/metrics"}),
    # FastAPI's Swagger page loads its OAuth2 redirect helper from under /docs too.
    PublicRoute.DOCS: frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}),
}


@dataclass(frozen=True)
class KeyIdentity:
    """Who is calling: what the route may know about the caller's key (not the key)."""

    name: str
    role: Role
    models: frozenset[str] | None
    may_load: bool = True
    priority: int = 0  # lower is served earlier (vLLM's convention)
    priority_bounds: tuple[int, int] = (0, PRIORITY_LAST)  # what a request may ask for
    weight: float = 1.0  # its share of a busy model against keys of equal priority

    def allows(self, model: str) -> bool:
        """Whether this key may use ``model``."""
        return self.models is None or model in self.models


def key_identity(key: ApiKey) -> KeyIdentity:
    """What routes may know of a configured key: its name, role, models, may_load, and
    its priority and share of a busy model."""
    return KeyIdentity(
        name=key.name,
        role=key.role,
        models=frozenset(key.models) if key.models is not None else None,
        may_load=key.may_load,
        priority=key.priority,
        priority_bounds=key.priority_bounds(),
        weight=key.weight,
    )


def check_model_allowed(scope: Scope, model: str, names: Sequence[str] = ()) -> None:
    """Raise ``ModelNotAllowedError`` (403) if the caller's key may not use ``model``.

    ``names``: every name of the entry ``model`` stands for (its name and aliases); a key that
    lists any of them may use it by any of them. With no key in ``scope`` (the API is open, or
    the route is public) every model is allowed.
    """
    identity: KeyIdentity | None = scope.get(KEY_SCOPE)
    if identity is not None and not any(identity.allows(n) for n in (model, *names)):
        raise ModelNotAllowedError(f"this API key may not use model {model!r}", param="model")


class Access:
    """Who may do what without a key; one place for the loopback and anonymous rules."""

    def __init__(self, config: AuthConfig) -> None:
        self.any_keys = bool(config.keys)
        self.admin_keys = any(key.role is Role.ADMIN for key in config.keys)
        self.anonymous = config.anonymous

    def anonymous_allowed(self, role: Role | None, scope: Scope) -> bool:
        """Whether a caller without a key may reach a route that needs ``role`` (None: any
        key)."""
        loopback = is_loopback(scope)
        admin_ok = loopback and not self.admin_keys
        user_ok = self.anonymous or (loopback and not self.any_keys)
        if role is Role.ADMIN:
            return admin_ok
        if role is Role.USER:
            return user_ok
        return admin_ok or user_ok

    def allowed(self, identity: KeyIdentity | None, role: Role | None, scope: Scope) -> bool:
        """Whether ``identity`` (None: no key) may reach a route that needs ``role``."""
        if identity is not None and (role is not Role.ADMIN or identity.role is Role.ADMIN):
            return True
        return self.anonymous_allowed(role, scope)

    def refusal(
        self, identity: KeyIdentity | None, role: Role | None, scope: Scope
    ) -> ApplianceError:
        """The error for a caller that ``allowed`` refused, saying what would let it in."""
        if role is Role.ADMIN and not self.admin_keys:
            return PermissionDeniedError(
                "the admin API answers only on this machine's loopback address until an admin "
                "key is configured (appliance up --generate-admin-key, or role: admin in the "
                "keys file)"
            )
        if identity is not None:
            return PermissionDeniedError("this route needs an admin API key")
        if not self.any_keys:
            return AuthenticationError(
                "this appliance serves other machines only with an API key; the operator can "
                "configure keys, or open /v1 with --allow-anonymous"
            )
        return _missing_or_wrong(scope)


def caller_is_admin(scope: Scope) -> bool:
    """Whether the request's caller may use the admin API (and so see backend URLs)."""
    access = scope.get(ACCESS_SCOPE)
    return isinstance(access, Access) and access.allowed(scope.get(KEY_SCOPE), Role.ADMIN, scope)


def require_role(role: Role) -> Callable[[Request], None]:
    """A route dependency refusing callers who may not use a route that needs ``role``.

    Attached to the routers, so the role goes wherever the route is mounted; it fails closed
    when the auth middleware did not run.
    """

    def check(request: Request) -> None:
        access = request.scope.get(ACCESS_SCOPE)
        if not isinstance(access, Access):
            raise PermissionDeniedError("access control is not configured for this route")
        identity = request.scope.get(KEY_SCOPE)
        if not access.allowed(identity, role, request.scope):
            raise access.refusal(identity, role, request.scope)

    return check


@dataclass
class _Entry:
    digest: bytes
    identity: KeyIdentity
    limits: KeyLimits


def key_limits_of(
    config: AuthConfig, *, board: LendingBoard | None = None, clock: Clock = time.monotonic
) -> dict[str, KeyLimits]:
    """Each key's rate and concurrency limits, by key name, counted on ``board`` (made with
    ``config.rate_windows()``; None: a private one): one set for every HTTP process."""
    board = board if board is not None else LendingBoard.private(config.rate_windows())
    return {
        key.name: KeyLimits(
            requests_per_minute=key.requests_per_minute,
            max_concurrent=key.max_concurrent,
            cells=board.key_cells(index),
            clock=clock,
        )
        for index, key in enumerate(config.keys)
    }


class AuthMiddleware:
    """Bearer-key check, role check and per-key limits, in front of every non-public route."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: AuthConfig,
        clock: Clock = time.monotonic,
        limits: Mapping[str, KeyLimits] | None = None,
        slots_elsewhere: bool = False,
    ) -> None:
        """``limits``: the keys' limits (default: a set of this middleware's own);
        ``slots_elsewhere``: an HTTP worker's middleware, whose requests take their key's
        slot with their model lease from the owner (``appliance.workers``), not here."""
        self.app = app
        limits = limits if limits is not None else key_limits_of(config, clock=clock)
        self._slots_here = not slots_elsewhere
        # Hashed once here: requests are compared by digest, in time independent of the key.
        self._entries = [
            _Entry(
                digest=key_digest(key.key.get_secret_value()),
                identity=key_identity(key),
                limits=limits[key.name],
            )
            for key in config.keys
        ]
        self._backoff = AuthBackoff(
            free_failures=config.failed_keys_free,
            max_delay_seconds=config.failed_keys_max_wait_seconds,
            clock=clock,
        )
        self._public = frozenset().union(*(_PUBLIC_PATHS[route] for route in config.public))
        self._metrics_from = tuple(config.metrics_from)
        self._access = Access(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope[ACCESS_SCOPE] = self._access
        path: str = scope.get("path", "")
        if self._metrics_scraper(path, scope):
            scope[SCRAPER_SCOPE] = True
            await self.app(scope, receive, send)
            return
        if path in self._public:
            # Open to all, but a right key still says who asks (an admin's /metrics has the
            # per-key series); a wrong one is ignored, as no key is needed.
            known = self._find(scope) if self._entries else None
            if known is not None:
                scope[KEY_SCOPE] = known.identity
            await self.app(scope, receive, send)
            return
        needed = _needed_role(path, scope.get("root_path", ""))
        # With no keys configured, a presented key means nothing (the OpenAI SDK always sends
        # one): the caller is anonymous.
        client = client_of(peer_address(scope))
        presented = self._entries and _bearer(scope) is not None
        waiting = self._backoff.wait(client) if presented else None
        if waiting is not None:
            # Not even checked: a client guessing keys gets no answer about its guesses.
            refusal = RateLimitedError(
                "too many wrong API keys from this address; retry later", retry_after=waiting
            )
            await self._refuse(scope, receive, send, refusal)
            return
        entry = self._find(scope) if self._entries else None
        if entry is None and presented:
            self._backoff.failed(client)
            await self._refuse(scope, receive, send, _missing_or_wrong(scope))
            return
        if entry is not None:
            self._backoff.succeeded(client)
        identity = entry.identity if entry is not None else None
        info = scope.get(INFO_KEY)
        if identity is not None and isinstance(info, RequestInfo):
            info.extra["key"] = identity.name
        if not self._access.allowed(identity, needed, scope):
            await self._refuse(scope, receive, send, self._access.refusal(identity, needed, scope))
            return
        if entry is None:
            await self.app(scope, receive, send)
            return
        if not self._slots_here:
            scope[KEY_SCOPE] = entry.identity
            await self.app(scope, receive, send)
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

    def _metrics_scraper(self, path: str, scope: Scope) -> bool:
        if not self._metrics_from or path not in _PUBLIC_PATHS[PublicRoute.METRICS]:
            return False
        address = peer_address(scope)
        return address is not None and any(address in net for net in self._metrics_from)

    def _find(self, scope: Scope) -> _Entry | None:
        presented = _bearer(scope)
        if presented is None:
            return None
        digest = key_digest(presented)
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
        response = appliance_error_response(exc, scope.get("path", ""))
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


def _needed_role(path: str, root_path: str = "") -> Role | None:
    """The role a path needs: admin for /admin, user for /v1 and Ollama's /api, None (any
    key) for the rest."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    # Repeated slashes are collapsed so that "//admin" cannot pass as a non-admin path.
    parts = [part for part in path.split("/") if part]
    first = parts[0] if parts else ""
    if first == "admin":
        return Role.ADMIN
    if first in ("v1", "api") or is_model_route("/" + "/".join(parts)):
        return Role.USER  # the model routes outside /v1 (/tokenize, /rerank...) too
    return None


def may_load_on_demand(scope: Scope) -> bool:
    """Whether the request's caller may start an on-demand load (callers without a key may:
    they are on loopback, or the operator opened /v1 to them)."""
    identity = scope.get(KEY_SCOPE)
    return identity is None or bool(identity.may_load)


def model_allowed(scope: Scope, model: str) -> bool:
    """True when the request's key (if any) may use ``model``."""
    identity = scope.get(KEY_SCOPE)
    return identity is None or identity.allows(model)
