"""``GET /admin/usage`` and the ``appliance usage`` CLI's date parsing."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from appliance.api.auth import AuthConfig, AuthMiddleware
from appliance.api.error_handlers import register_error_handlers
from appliance.api.middleware import RequestInfo
from appliance.api.usage_routes import build_usage_router
from appliance.cli.usage_cmd import since_day
from appliance.engines.base import Usage
from appliance.usage.ledger import UsageLedger
from appliance.usage.quotas import QuotaConfig
from appliance.usage.store import UsageStore


def test_admin_usage(tmp_path: Path) -> None:
    ledger = UsageLedger(
        UsageStore(tmp_path / "usage.db"),
        key_names=["alice"],
        quotas=QuotaConfig(),
        registry=CollectorRegistry(),
        model_label=lambda name: name or "",
    )
    info = RequestInfo(request_id="r", model="chat", usage=Usage(2, 3))
    info.extra["key"] = "alice"
    ledger.on_request_done(info, 200, 0.1)
    app = FastAPI()
    register_error_handlers(app)
    app.include_router(build_usage_router(ledger))
    # No keys: the admin API answers loopback only.
    app.add_middleware(AuthMiddleware, config=AuthConfig())
    assert TestClient(app, client=("192.0.2.7", 5000)).get("/admin/usage").status_code == 403
    http = TestClient(app, client=("127.0.0.1", 5000))
    body = http.get("/admin/usage", params={"key": "alice"}).json()
    assert body["data"] == [
        {
            "key": "alice",
            "model": "chat",
            "requests": 1,
            "errors": 0,
            "prompt_tokens": 2,
            "completion_tokens": 3,
            "total_tokens": 5,
        }
    ]
    assert http.get("/admin/usage", params={"since": "2999-01-01"}).json()["data"] == []
    bad = http.get("/admin/usage", params={"since": "last week"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "since"


def test_since_day() -> None:
    today = date(2026, 11, 26)
    assert since_day("today", today) == today
    assert since_day("7d", today) == date(2026, 11, 19)
    assert since_day("2026-11-01", today) == date(2026, 11, 1)
    with pytest.raises(typer.BadParameter):
        since_day("yesterday", today)
