"""`appliance models list` shows every name a client may use: models, aliases, adapters."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from appliance.cli import models_cmd
from appliance.cli.main import app

BODY = {
    "catalogue_source": "file",
    "data": [
        {
            "name": "tiny-chat",
            "aliases": ["gpt-4o-mini"],
            "adapters": [{"name": "tiny-sql", "source": "/loras/sql"}],
            "task": "generate",
            "version": "1",
            "owner": "me",
            "source": "/models/tiny",
            "state": "ready",
        },
        {
            "name": "far",
            "aliases": [],
            "adapters": [],
            "task": "generate",
            "version": "1",
            "owner": "box-a",
            "backend_url": "http://box-a:8000",
            "state": "unavailable",
        },
    ],
}


def test_models_list_shows_aliases_adapters_and_remote_states(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {"data": [{"name": "tiny-chat", "present": True, "size_bytes": 2**20}]}

    def call(self: Any, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert (method, path) in (("GET", "/admin/models"), ("GET", "/admin/files"))
        return BODY if path == "/admin/models" else files

    monkeypatch.setattr(models_cmd.AdminClient, "call", call)
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    chat = next(line for line in lines if line.startswith("│ tiny-chat"))
    assert "gpt-4o-mini" in chat and "ready" in chat and "yes, 1.0 MB" in chat
    sql = next(line for line in lines if line.startswith("│ tiny-sql"))
    assert "LoRA of tiny-chat: /loras/sql" in sql
    far = next(line for line in lines if line.startswith("│ far"))
    assert "http://box-a:8000" in far and "unavailable" in far
