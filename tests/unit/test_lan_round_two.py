"""Issue 25's smaller attacks, tried as an outsider with a user key would, through the whole
app on a test engine: each refused, and everyone else still served."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.api_keys import AuthConfig
from appliance.logs import JsonFormatter
from tests.unit.test_body_screen import ADMIN, USER, RecordingMaker, _client, served

__all__ = ["served"]  # the fixture, shared with the body-screen tests


def test_a_long_path_is_logged_once_and_cut(
    served: tuple[TestClient, RecordingMaker], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = served
    long_path = "/v1/" + "a" * 60_000
    with caplog.at_level(logging.INFO, logger="appliance"):
        assert client.get(long_path, headers=USER).status_code == 404
    lines = [r for r in caplog.records if getattr(r, "event", None) == "request"]
    assert len(lines) == 1
    record = lines[0]
    rendered = JsonFormatter().format(record)
    assert rendered.count("aaaaaaaaaa") <= 20 and len(rendered) < 1000
    assert record.path.endswith("...(60004 chars)") and "/v1/" not in record.getMessage()


def test_a_user_key_sees_no_other_keys_on_metrics(
    served: tuple[TestClient, RecordingMaker],
) -> None:
    client, _ = served
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat, headers=ADMIN).status_code == 200
    assert client.post("/v1/chat/completions", json=chat, headers=USER).status_code == 200
    operator = client.get("/metrics", headers=ADMIN).text
    assert 'appliance_key_requests_total{key="ops",model="chat"}' in operator
    user = client.get("/metrics", headers=USER)
    assert user.status_code == 200
    assert "appliance_key_requests_total{" not in user.text
    assert 'key="ops"' not in user.text and 'key="alice"' not in user.text
    # The model series are still there for everyone.
    assert 'model="chat"' in user.text


def test_docs_load_no_third_party_script(served: tuple[TestClient, RecordingMaker]) -> None:
    client, _ = served
    docs = client.get("/docs", headers=USER)
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "<script" not in docs.text.lower() and "cdn" not in docs.text.lower()
    assert "script-src" not in docs.headers["content-security-policy"]
    assert "default-src 'none'" in docs.headers["content-security-policy"]
    assert "/v1/chat/completions" in docs.text
    assert client.get("/redoc", headers=USER).status_code == 404
    assert "/v1/chat/completions" in client.get("/openapi.json", headers=USER).json()["paths"]


def test_public_metrics_still_know_an_admin(tmp_path: Path) -> None:
    keys = AuthConfig.model_validate(
        {
            "public": ["health", "metrics"],
            "keys": [
                {"name": "ops", "key": ADMIN["Authorization"][7:], "role": "admin"},
                {"name": "alice", "key": USER["Authorization"][7:]},
            ],
        }
    )
    for client, _ in _client(tmp_path, auth=keys):
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=chat, headers=USER).status_code == 200
        assert 'key="alice"' in client.get("/metrics", headers=ADMIN).text
        for headers in ({}, USER, {"Authorization": "Bearer sk-wrong"}):
            scraped = client.get("/metrics", headers=headers)
            assert scraped.status_code == 200 and 'key="alice"' not in scraped.text
