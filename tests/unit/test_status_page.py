"""The status page's files: served from the package, ahead of the key check, with a strict CSP."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance.api.status_page import StatusPage


def client() -> TestClient:
    app = FastAPI()

    @app.get("/elsewhere")
    async def elsewhere() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(StatusPage)
    return TestClient(app)


def test_page_and_assets() -> None:
    http = client()
    for path in ("/", "/ui"):
        moved = http.get(path, follow_redirects=False)
        assert moved.status_code == 307
        assert moved.headers["location"] == "/ui/"
    page = http.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    # Everything the page loads is its own: no CDN, no absolute URL.
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert "//" not in asset
        assert http.get(f"/ui/{asset}").status_code == 200
    script = http.get("/ui/status.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "http://" not in script.text and "https://" not in script.text


def test_unknown_file_and_other_routes() -> None:
    http = client()
    missing = http.get("/ui/secrets.txt")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert http.get("/elsewhere").json() == {"ok": "yes"}
    assert http.post("/ui/").status_code in (404, 405)  # only GET and HEAD are the page's
