"""`appliance models list` shows every name a client may use: models, aliases, adapters."""

from __future__ import annotations

import json
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
    # Not a terminal (a pipe, a script): plain columns, one line a model.
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ALIASES",
        "TASK",
        "VERSION",
        "OWNER",
        "SOURCE",
        "STATE",
        "ON",
        "DISK",
    ]
    chat = next(line for line in lines if line.startswith("tiny-chat "))
    assert "gpt-4o-mini" in chat and "ready" in chat and "yes, 1.0 MB" in chat
    sql = next(line for line in lines if line.startswith("tiny-sql "))
    assert "LoRA of tiny-chat: /loras/sql" in sql
    far = next(line for line in lines if line.startswith("far "))
    assert "http://box-a:8000" in far and "unavailable" in far


LONG = "a-model-name-far-longer-than-any-column-an-80-column-table-could-give-it-v2"


def test_a_pipe_finds_every_name_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance models list | grep NAME` finds each model, however long its name (issue 28)."""
    body = {**BODY, "data": [*BODY["data"], {**BODY["data"][1], "name": LONG}]}

    def call(self: Any, method: str, path: str, **_: Any) -> dict[str, Any]:
        return body if path == "/admin/models" else {"data": []}

    monkeypatch.setattr(models_cmd.AdminClient, "call", call)
    for command in (["models", "list"], ["models", "ps"]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        names = [line.split()[0] for line in result.output.splitlines()[1:]]
        assert LONG in names and "tiny-chat" in names, result.output


def test_json_output_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"data": [{"name": "tiny-chat", "present": True, "size_bytes": 2**20}]}
    answers = {
        "/admin/models": BODY,
        "/admin/files": files,
        "/admin/models/tiny-chat/adapters": {"object": "list", "data": BODY["data"][0]["adapters"]},
        "/admin/models/tiny-chat/plan": {"name": "tiny-chat", "fits": True, "devices": []},
        "/admin/usage": {"data": [{"key": "k", "model": "tiny-chat", "requests": 2}]},
    }

    def call(self: Any, method: str, path: str, **_: Any) -> dict[str, Any]:
        return answers[path]

    monkeypatch.setattr(models_cmd.AdminClient, "call", call)
    runner = CliRunner()

    def run(*command: str) -> Any:
        result = runner.invoke(app, [*command, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    listed = run("models", "list")
    assert [m["name"] for m in listed["data"]] == ["tiny-chat", "far"]
    assert listed["data"][0]["files"]["present"] is True and listed["data"][1]["files"] is None
    assert [m["name"] for m in run("models", "ps")["data"]] == ["tiny-chat", "far"]
    assert run("adapters", "list", "tiny-chat")["data"][0]["name"] == "tiny-sql"
    assert run("models", "plan", "tiny-chat")["fits"] is True
    assert run("usage")["data"][0]["requests"] == 2
