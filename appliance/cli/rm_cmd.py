"""`appliance models rm NAME|HUB_ID`: free a hub model's files from the cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from appliance.cli.models_cmd import KEY_OPTION, URL_OPTION, AdminClient
from appliance.cli.pull_cmd import local_target
from appliance.errors import ConfigError
from appliance.hub.disk import remove_from_cache
from appliance.hub.pull import PullError, format_bytes

out = Console()
err = Console(stderr=True)


def rm(
    name: str = typer.Argument(..., help="A catalogue name, or a hub id (ORG/NAME)."),
    local: bool = typer.Option(
        False, "--local", help="Free this machine's cache (HF_HOME), not the appliance's."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="With --local: the models.yaml that names NAME."
    ),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Delete a hub model's cached files (every revision); refused while it is loaded.

    Local folders in models.yaml are the operator's files and are never deleted.
    """
    if local:
        try:
            target = local_target(name, config)
            freed = remove_from_cache(target)
        except (PullError, ConfigError) as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        repo = target.repo_id
    else:
        body = AdminClient(url, api_key).call("DELETE", f"/admin/models/{name}/files")
        freed, repo = int(body.get("freed_bytes") or 0), body.get("repo", name)
    if freed:
        out.print(f"{repo}: freed {format_bytes(freed)}", highlight=False)
    else:
        out.print(f"{repo}: nothing on disk", highlight=False)
