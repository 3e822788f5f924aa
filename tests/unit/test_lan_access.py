"""Safe on a LAN by default: who reaches what without a key, from where; cross-site requests.

A tiny app with the real middleware stack (request context, cross-site guard, keys) and the
real role dependencies; the caller's address is set on the ASGI transport, so "from the LAN"
and "from loopback" are both exercised without a network. The integration test
(tests/integration/test_lan_safety.py) repeats the attacks over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request

from appliance.admin_key import ensure_admin_key, find_admin_key
from appliance.api.auth import (
    ApiKey,
    AuthConfig,
    AuthMiddleware,
    PublicRoute,
    Role,
    caller_is_admin,
    require_role,
)
from appliance.api.auth_file import describe_open, with_generated_admin_key
from appliance.api.cross_site import CrossSiteGuard
from appliance.api.error_handlers import register_error_handlers
from appliance.api.middleware import RequestContextMiddleware
from appliance.errors import ConfigError

USER_KEY = "sk-user-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
LOOPBACK = ("127.0.0.1", 40000)
LAN = ("192.168.1.50", 40000)
HOST = "box.lan"


def build_app(config: AuthConfig, *, root_path: str = "", cors: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(root_path=root_path)
    register_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_role(Role.USER))])
    admin = APIRouter(prefix="/admin", dependencies=[Depends(require_role(Role.ADMIN))])

    @v1.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"admin": caller_is_admin(request.scope)}

    @v1.post("/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        return await request.json()  # type: ignore[no-any-return]

    @admin.post("/models/{name}/unload")
    async def unload(name: str) -> dict[str, str]:
        return {"unloaded": name}

    # The same routes again under another mount, as a new router or a proxy prefix would.
    moved = APIRouter(prefix="/moved")
    moved.include_router(admin)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> str:
        return "appliance_up 1"

    app.include_router(v1)
    app.include_router(admin)
    app.include_router(moved)
    app.add_middleware(AuthMiddleware, config=config)
    app.add_middleware(
        CrossSiteGuard, allowed_hosts={HOST, "127.0.0.1", "localhost"}, cors_origins=cors
    )
    app.add_middleware(RequestContextMiddleware, max_body_bytes=2**20, body_timeout=0.2)
    return app


Call = Callable[..., httpx.Response]


def caller(app: FastAPI) -> Call:
    """``call(method, path, client=LAN, key=None, host=HOST, **kwargs)``."""

    def call(
        method: str,
        path: str,
        *,
        client: tuple[str, int] = LAN,
        key: str | None = None,
        host: str = HOST,
        **kwargs: Any,
    ) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as c:
                headers = dict(kwargs.pop("headers", {}))
                if key is not None:
                    headers["Authorization"] = f"Bearer {key}"
                return await c.request(method, path, headers=headers, **kwargs)

        return asyncio.run(go())

    return call


def keys(*roles: Role) -> list[ApiKey]:
    chosen = {Role.USER: ("alice", USER_KEY), Role.ADMIN: ("ops", ADMIN_KEY)}
    return [
        ApiKey.model_validate({"name": chosen[r][0], "key": chosen[r][1], "role": r}) for r in roles
    ]


def code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


# --- no keys: loopback only -----------------------------------------------------------------


def test_without_keys_loopback_may_do_everything() -> None:
    call = caller(build_app(AuthConfig()))
    # The OpenAI SDK always sends some key: with no keys configured it means nothing.
    models = call("GET", "/v1/models", client=LOOPBACK, key="unused")
    assert models.status_code == 200 and models.json() == {"admin": True}
    assert call("POST", "/admin/models/m/unload", client=LOOPBACK).status_code == 200
    assert call("GET", "/metrics", client=LOOPBACK).status_code == 200


def test_without_keys_the_lan_gets_nothing_but_health() -> None:
    call = caller(build_app(AuthConfig()))
    refused = call("GET", "/v1/models", key="unused")
    assert refused.status_code == 401 and "--allow-anonymous" in refused.json()["error"]["message"]
    admin = call("POST", "/admin/models/m/unload")
    assert admin.status_code == 403 and "loopback" in admin.json()["error"]["message"]
    assert call("GET", "/metrics").status_code == 401
    assert call("GET", "/health").status_code == 200


def test_anonymous_opens_v1_to_the_lan_but_not_admin() -> None:
    config = AuthConfig(anonymous=True)
    call = caller(build_app(config))
    models = call("GET", "/v1/models")
    assert models.status_code == 200 and models.json() == {"admin": False}
    assert call("POST", "/admin/models/m/unload").status_code == 403
    warning = describe_open(config)
    assert warning is not None and "anonymous" in warning
    closed = describe_open(AuthConfig())
    assert closed is not None and "loopback" in closed


# --- keys ----------------------------------------------------------------------------------


def test_user_key_only_leaves_admin_to_loopback() -> None:
    call = caller(build_app(AuthConfig(keys=keys(Role.USER))))
    assert call("GET", "/v1/models", key=USER_KEY).json() == {"admin": False}
    assert call("POST", "/admin/models/m/unload", key=USER_KEY).status_code == 403
    assert call("POST", "/admin/models/m/unload").status_code == 403
    assert call("POST", "/admin/models/m/unload", client=LOOPBACK).status_code == 200
    # Keys exist, so /v1 needs one, from loopback too.
    assert call("GET", "/v1/models", client=LOOPBACK).status_code == 401


def test_admin_key_reaches_admin_from_the_lan() -> None:
    call = caller(build_app(AuthConfig(keys=keys(Role.USER, Role.ADMIN))))
    assert call("POST", "/admin/models/m/unload", key=ADMIN_KEY).status_code == 200
    assert call("GET", "/v1/models", key=ADMIN_KEY).json() == {"admin": True}
    assert call("POST", "/admin/models/m/unload", key=USER_KEY).status_code == 403
    # With an admin key configured, loopback needs it too.
    assert call("POST", "/admin/models/m/unload", client=LOOPBACK).status_code == 401


def test_roles_go_with_the_routes_wherever_they_are_mounted() -> None:
    call = caller(build_app(AuthConfig(keys=keys(Role.USER, Role.ADMIN))))
    moved = call("POST", "/moved/admin/models/m/unload", key=USER_KEY)
    assert moved.status_code == 403 and code(moved) == "permission_denied"
    assert call("POST", "/moved/admin/models/m/unload", key=ADMIN_KEY).status_code == 200
    behind = caller(build_app(AuthConfig(keys=keys(Role.USER, Role.ADMIN)), root_path="/api"))
    assert behind("POST", "/api/admin/models/m/unload", key=USER_KEY).status_code == 403


def test_metrics_from_an_allowed_network_need_no_key() -> None:
    config = AuthConfig(keys=keys(Role.USER), metrics_from=["192.168.1.0/24"])
    call = caller(build_app(config))
    assert call("GET", "/metrics").status_code == 200
    assert call("GET", "/metrics", client=("10.0.0.9", 1)).status_code == 401
    assert call("GET", "/v1/models").status_code == 401  # only /metrics
    public = caller(build_app(AuthConfig(keys=keys(Role.USER), public={PublicRoute.METRICS})))
    assert public("GET", "/metrics", client=("10.0.0.9", 1)).status_code == 200


# --- cross-site ------------------------------------------------------------------------------


def test_a_foreign_host_is_refused() -> None:
    call = caller(build_app(AuthConfig()))
    rebound = call("GET", "/v1/models", client=LOOPBACK, host="evil.example:8000")
    assert rebound.status_code == 400 and code(rebound) == "host_not_allowed"
    assert "evil" not in rebound.text
    assert call("GET", "/v1/models", client=LOOPBACK, host="127.0.0.1:8000").status_code == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_post_bodies_must_be_json(content_type: str | None) -> None:
    call = caller(build_app(AuthConfig()))
    headers = {"Content-Type": content_type} if content_type else {}
    response = call(
        "POST", "/v1/chat/completions", client=LOOPBACK, content=b'{"model": "m"}', headers=headers
    )
    assert response.status_code == 415 and code(response) == "unsupported_media_type"
    ok = call(
        "POST",
        "/v1/chat/completions",
        client=LOOPBACK,
        content=b'{"model": "m"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200
    # A bodiless POST (the CLI's) needs no type; a browser would add an Origin to it.
    assert call("POST", "/admin/models/m/unload", client=LOOPBACK).status_code == 200


def test_a_page_of_another_origin_is_refused() -> None:
    call = caller(build_app(AuthConfig()))
    for origin in ("http://evil.example", "null", "http://box.lan:9999"):
        response = call(
            "POST", "/admin/models/m/unload", client=LOOPBACK, headers={"Origin": origin}
        )
        assert response.status_code == 403 and code(response) == "cross_origin_refused", origin
    same = call("GET", "/v1/models", client=LOOPBACK, headers={"Origin": f"http://{HOST}"})
    assert same.status_code == 200


def test_cors_is_off_unless_origins_are_configured() -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    off = caller(build_app(AuthConfig()))("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    app = build_app(AuthConfig(anonymous=True), cors=("https://app.example",))
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"])
    # (The real app puts CORS inside the guard; here the order does not matter.)
    on = caller(app)("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert on.headers["access-control-allow-origin"] == "https://app.example"


def test_a_stalled_body_times_out() -> None:
    async def go() -> httpx.Response:
        app = build_app(AuthConfig())
        stalled = asyncio.Event()

        async def body() -> Any:
            yield b'{"model": '
            await stalled.wait()  # never set: the upload stalls
            yield b'"m"}'

        transport = httpx.ASGITransport(app=app, client=LOOPBACK)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{HOST}") as c:
            return await c.post(
                "/v1/chat/completions",
                content=body(),
                headers={"Content-Type": "application/json"},
            )

    response = asyncio.run(go())
    assert response.status_code == 408 and code(response) == "body_timeout"


# --- the generated admin key -------------------------------------------------------------


def test_generated_admin_key_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "admin-key"
    key = ensure_admin_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= 40
    assert ensure_admin_key(path) == key  # kept across starts
    env = {"APPLIANCE_ADMIN_KEY_FILE": str(path)}
    assert find_admin_key(None, env) == key
    assert find_admin_key("flag", env) == "flag"
    assert find_admin_key(None, {**env, "APPLIANCE_ADMIN_KEY": "from-env"}) == "from-env"
    config = with_generated_admin_key(AuthConfig(), path)
    assert [(k.name, k.role) for k in config.keys] == [("generated-admin", Role.ADMIN)]
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_admin_key(path)
    assert find_admin_key(None, env) is None


# --- failures are the operator's to read ---------------------------------------------------


class _FailedRouter:
    """A router whose one model failed, with a reason naming a path."""

    def __init__(self) -> None:
        from appliance.catalogue.catalogue import Catalogue
        from appliance.catalogue.registry_client import CatalogueSource
        from appliance.catalogue.schema import (
            LocalModelSpec,
        )

        self.catalogue = Catalogue([LocalModelSpec(name="m", source="org/m")], CatalogueSource.FILE)

    def target_of(self, model: str) -> Any:
        from appliance.supervisor.supervisor import Target

        return Target(model, model, (model,)) if model in self.catalogue else None

    def engine_for(self, model: str, endpoint: Any, *, may_load: bool | None = None) -> Any:
        from appliance.errors import ModelFailedError

        raise ModelFailedError(f"model {model!r} failed: /srv/secret/weights missing")


def test_why_a_model_failed_is_shown_to_admins_only() -> None:
    from unittest.mock import MagicMock

    from appliance.api.model_access import TableAccess
    from appliance.api.openai_routes import build_openai_router

    app = FastAPI()
    register_error_handlers(app)
    access = TableAccess(_FailedRouter(), MagicMock())  # type: ignore[arg-type]
    app.include_router(build_openai_router(access, MagicMock()))
    app.add_middleware(AuthMiddleware, config=AuthConfig(keys=keys(Role.USER)))
    app.add_middleware(RequestContextMiddleware, max_body_bytes=2**20)
    call = caller(app)
    body = {"model": "m", "prompt": "x"}
    user = call("POST", "/v1/completions", key=USER_KEY, json=body)
    assert user.status_code == 503 and "/srv" not in user.text
    assert "admin API" in user.json()["error"]["message"]
    # No admin key is configured, so a user key on loopback is as good as an admin.
    operator = call("POST", "/v1/completions", key=USER_KEY, json=body, client=LOOPBACK)
    assert operator.status_code == 503 and "/srv/secret" in operator.text


@pytest.mark.parametrize(
    ("body", "deep"),
    [(None, False), (5, False), ("x", False), ([[[]]], False), ([[[[]]]], True)],
)
def test_nesting_is_measured_for_any_json(body: Any, deep: bool) -> None:
    from appliance.api.serving import nested_deeper_than

    assert nested_deeper_than(body, 3) is deep
