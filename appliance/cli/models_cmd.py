"""`appliance models ...`: operate a running appliance through its admin API."""

from __future__ import annotations

import os
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.admin_key import find_admin_key
from appliance.cli.files_view import describe_files
from appliance.cli.load_progress import describe_state, describe_times, follow_load
from appliance.cli.output import JSON_OPTION, print_json, print_table

models_app = typer.Typer(help="List, load and unload models on a running appliance.")
out = Console()
err = Console(stderr=True)

URL_OPTION = typer.Option(
    "http://127.0.0.1:8000",
    "--url",
    envvar="APPLIANCE_URL",
    help="The appliance's base URL (or set APPLIANCE_URL).",
)
KEY_OPTION = typer.Option(
    None,
    "--api-key",
    envvar="APPLIANCE_ADMIN_KEY",
    help="Admin API key (else $APPLIANCE_ADMIN_KEY, else the file --generate-admin-key wrote).",
)


class AdminClient:
    """A thin client of the admin API that turns failures into a message and exit code."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        """``api_key``: the flag's or APPLIANCE_ADMIN_KEY's; else the generated key file's."""
        api_key = find_admin_key(api_key, os.environ)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.url = url

    def call(
        self,
        method: str,
        path: str,
        *,
        timeout: float | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one request (with a ``json`` body if given); exit 1 with the server's message
        if it fails."""
        try:
            response = self._client.request(
                method,
                path,
                json=json,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            err.print(
                f"[bold red]error:[/] cannot reach the appliance at {self.url}: {exc}",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text or response.reason_phrase}}
        if response.status_code >= 400:
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            err.print(
                f"[bold red]error:[/] {message or response.reason_phrase} "
                f"(HTTP {response.status_code})",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)
        return body if isinstance(body, dict) else {"data": body}


def _gib(value: Any) -> str:
    return f"{value:.1f} GiB" if isinstance(value, (int, float)) else "-"


@models_app.command("list")
def list_models(
    url: str = URL_OPTION, api_key: str | None = KEY_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """Every model in the catalogue, local and remote, with its state."""
    client = AdminClient(url, api_key)
    body = client.call("GET", "/admin/models")
    on_disk = {f["name"]: f for f in client.call("GET", "/admin/files").get("data", [])}
    if as_json:
        # The admin API's answer, each model with its files on disk (null: not a local one).
        print_json({**body, "data": [{**m, "files": on_disk.get(m["name"])} for m in body["data"]]})
        return
    table = Table(title=f"catalogue ({body.get('catalogue_source', '?')})")
    for column in ("NAME", "ALIASES", "TASK", "VERSION", "OWNER", "SOURCE", "STATE", "ON DISK"):
        table.add_column(column)
    for m in body.get("data", []):
        table.add_row(
            m["name"],
            ", ".join(m.get("aliases") or []) or "-",
            m["task"],
            m["version"],
            m["owner"],
            m.get("source") or m.get("backend_url") or "",
            m.get("state", "-"),
            describe_files(on_disk.get(m["name"])),
        )
        for adapter in m.get("adapters") or []:
            # A LoRA adapter is a model name of its own, served by its parent's engine.
            table.add_row(
                adapter["name"],
                "-",
                m["task"],
                m["version"],
                m["owner"],
                f"LoRA of {m['name']}: {adapter['source']}",
                m.get("state", "-"),
                "-",
            )
    print_table(table, out)


@models_app.command("ps")
def ps(
    url: str = URL_OPTION, api_key: str | None = KEY_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """Models that are loaded or on their way: devices, memory, load time, requests."""
    body = AdminClient(url, api_key).call("GET", "/admin/models")
    running = [m for m in body.get("data", []) if m.get("state") not in (None, "unloaded")]
    if as_json:
        print_json({**body, "data": running})
        return
    table = Table(title=f"running models ({body.get('device_kind', '?')})")
    columns = (
        "NAME",
        "STATE",
        "DEVICES",
        "MEMORY",
        "SLEEP",
        "LOAD TIME",
        "IN FLIGHT",
        "LAST ERROR",
    )
    for column in columns:
        table.add_column(column)
    for m in running:
        devices = ",".join(str(d) for d in m.get("devices", [])) or "-"
        table.add_row(
            m["name"],
            describe_state(m),
            devices,
            _gib(m.get("memory_gib")),
            _sleep(m),
            describe_times(m),
            str(m.get("in_flight", 0)),
            (m.get("last_error") or "")[:60],
        )
    print_table(table, out)


def _sleep(model: dict[str, Any]) -> str:
    """``L1 (15.0 GiB host)``, ``L2``, or ``-`` for a model that is awake."""
    level = model.get("sleep_level")
    if not level:
        return "-"
    host = model.get("host_memory_gib")
    return f"L{level} ({host:.1f} GiB host)" if host else f"L{level}"


def _with_spinner(text: str, action: Any) -> dict[str, Any]:
    with Progress(
        SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        progress.add_task(text, total=None)
        return action()  # type: ignore[no-any-return]


@models_app.command("load")
def load(name: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Load a model and wait until it is ready (its download first, when its files are missing)."""
    client = AdminClient(url, api_key)
    body = follow_load(
        name,
        lambda: client.call("POST", f"/admin/models/{name}/load", timeout=3600),
        AdminClient(url, api_key),
        err,
    )
    evicted = body.get("evicted") or []
    note = f" (evicted: {', '.join(evicted)})" if evicted else ""
    load_s = body.get("load_seconds")
    took = f" in {load_s:.1f}s" if load_s else ""
    out.print(f"{name}: {body.get('state')}{took}{note}")


@models_app.command("unload")
def unload(name: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Drain a model (in-flight requests finish), then stop its engine."""
    client = AdminClient(url, api_key)
    body = _with_spinner(
        f"unloading {name}",
        lambda: client.call("POST", f"/admin/models/{name}/unload", timeout=600),
    )
    out.print(f"{name}: {body.get('state')}")


@models_app.command("reload")
def reload(url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Re-read models.yaml on the appliance and apply only what changed."""
    client = AdminClient(url, api_key)
    body = _with_spinner("reloading", lambda: client.call("POST", "/admin/reload", timeout=3600))
    for key in ("added", "removed", "changed"):
        names = body.get(key) or []
        out.print(f"{key}: {', '.join(names) if names else '-'}")


@models_app.command("sleep")
def sleep(
    name: str,
    level: int = typer.Option(1, min=1, max=2, help="1: weights to CPU memory; 2: dropped."),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Put a model to sleep (vLLM sleep mode, GPU only): frees GPU memory, keeps the engine."""
    body = AdminClient(url, api_key).call(
        "POST", f"/admin/models/{name}/sleep?level={level}", timeout=600
    )
    out.print(f"{name}: {body.get('state')}")


@models_app.command("wake")
def wake(name: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION) -> None:
    """Wake a sleeping model (GPU only)."""
    body = AdminClient(url, api_key).call("POST", f"/admin/models/{name}/wake", timeout=600)
    out.print(f"{name}: {body.get('state')}")
