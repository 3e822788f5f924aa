"""`appliance adapters ...`: LoRA adapters of a running model, through the admin API."""

from __future__ import annotations

from urllib.parse import quote

import typer
from rich.table import Table

from appliance.cli.models_cmd import KEY_OPTION, URL_OPTION, AdminClient, out
from appliance.cli.output import JSON_OPTION, print_json, print_table

adapters_app = typer.Typer(help="List, load and unload a model's LoRA adapters at run time.")


def _path(model: str) -> str:
    return f"/admin/models/{quote(model, safe='/')}/adapters"


@adapters_app.command("list")
def list_adapters(
    model: str = typer.Argument(..., help="The base model."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The LoRA adapters a model serves, each a model name of its own."""
    body = AdminClient(url, api_key).call("GET", _path(model))
    if as_json:
        print_json(body)
        return
    table = Table(title=f"adapters of {model}")
    for column in ("NAME", "SOURCE"):
        table.add_column(column)
    for adapter in body.get("data", []):
        table.add_row(adapter["name"], adapter["source"])
    print_table(table, out)


@adapters_app.command("load")
def load(
    model: str = typer.Argument(..., help="The base model (it must be ready)."),
    name: str = typer.Argument(..., help="The name clients will ask for."),
    source: str = typer.Argument(..., help="A folder on the appliance's host, or a hub id."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Serve a LoRA adapter on a running model, without restarting it."""
    AdminClient(url, api_key).call(
        "POST", _path(model) + "/load", json={"name": name, "source": source}, timeout=600
    )
    out.print(f"adapter {name} of {model}: loaded")


@adapters_app.command("unload")
def unload(
    model: str = typer.Argument(..., help="The base model."),
    name: str = typer.Argument(..., help="The adapter."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Stop serving a LoRA adapter."""
    AdminClient(url, api_key).call("POST", _path(model) + "/unload", json={"name": name})
    out.print(f"adapter {name} of {model}: unloaded")
