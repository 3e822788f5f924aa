"""`appliance models pull NAME|HUB_ID`: fetch a model's files ahead of its first load.

By default the appliance at ``--url`` pulls into its own cache (the one its engines read) and
streams its progress here; ``--local`` pulls in this process into this machine's cache, with
no appliance running. Either way: one bar per file plus a total in a terminal, one line per
finished file otherwise; a refusal is one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from appliance.admin_key import find_admin_key
from appliance.catalogue.config_file import load_catalogue_file
from appliance.cli.models_cmd import KEY_OPTION, URL_OPTION
from appliance.errors import ConfigError
from appliance.hub.pull import (
    PullError,
    PullTarget,
    check_repo_id,
    format_bytes,
    plan_pull,
    run_pull,
    target_for_spec,
)
from appliance.settings import Settings

out = Console()
err = Console(stderr=True)

TOTAL = "total"
# A pull here keeps the disk the appliance's own pulls keep (its settings hold the default).
_RESERVE = int(Settings.model_fields["disk_reserve_gib"].default * 2**30)


class PullView:
    """Draws pull events: rich bars in a terminal, plain lines in a log or a pipe."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}

    def __enter__(self) -> PullView:
        if self._live:
            self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._live:
            self._progress.stop()

    def show(self, event: dict[str, Any]) -> None:
        """Render one event (as ``PullEvent.to_dict`` gives it)."""
        kind = event.get("event")
        if kind == "plan":
            self._plan(event)
        elif kind in ("progress", "file_done"):
            path, done = str(event.get("file")), int(event.get("done") or 0)
            before, self._done[path] = self._done.get(path, 0), done
            if self._live and path in self._tasks:
                self._progress.update(self._tasks[path], completed=done)
                self._progress.advance(self._tasks[TOTAL], done - before)
            if kind == "file_done" and not self._live:
                self._console.print(f"  {path}  {format_bytes(done)}", highlight=False)
        elif kind == "done":
            self._console.print(
                f"pulled {event.get('repo')}: {format_bytes(event.get('total') or 0)} in "
                f"{event.get('folder')}",
                highlight=False,
                soft_wrap=True,
            )

    def _plan(self, event: dict[str, Any]) -> None:
        files = event.get("files") or []
        missing = [f for f in files if not f.get("cached")]
        self._console.print(
            f"pulling {event.get('repo')}: {len(files)} files, "
            f"{format_bytes(event.get('total') or 0)}"
            f" ({len(files) - len(missing)} already on disk)",
            highlight=False,
        )
        for f in files:
            self._done[f["path"]] = f["size"] if f.get("cached") else 0
        if not self._live:
            return
        self._tasks[TOTAL] = self._progress.add_task(
            TOTAL, total=event.get("total") or 0, completed=event.get("done") or 0
        )
        for f in missing:
            self._tasks[f["path"]] = self._progress.add_task(f["path"], total=f["size"])


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def local_target(name: str, config: Path | None) -> PullTarget:
    """NAME from ``config`` when it names it (its hub source), else NAME as a hub id."""
    if config is not None and config.exists():
        catalogue = load_catalogue_file(config)
        for spec in catalogue.models:
            if spec.name == name:
                return target_for_spec(spec, config.resolve().parent)
    return PullTarget(repo_id=check_repo_id(name))


def _pull_here(name: str, config: Path | None) -> None:
    try:
        target = local_target(name, config)
        plan = plan_pull(target.repo_id, revision=target.revision, cache_dir=target.cache_dir)
        with PullView(err) as view:
            run_pull(plan, lambda event: view.show(event.to_dict()), reserve_bytes=_RESERVE)
    except (PullError, ConfigError) as exc:
        raise _fail(str(exc)) from None


def _pull_remote(name: str, url: str, api_key: str | None) -> None:
    key = find_admin_key(api_key, os.environ)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # No read timeout: a big file's progress events may be minutes apart on a slow link.
    timeout = httpx.Timeout(30.0, read=None)
    try:
        with (
            httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client,
            client.stream("POST", f"/admin/models/{name}/pull") as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _fail(f"{_error_message(response)} (HTTP {response.status_code})")
            with PullView(err) as view:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("event") == "error":
                        raise _fail(str(event.get("message")))
                    view.show(event)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the appliance at {url}: {exc}") from None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or response.reason_phrase)


def pull(
    name: str = typer.Argument(..., help="A catalogue name, or a hub id (ORG/NAME)."),
    local: bool = typer.Option(
        False,
        "--local",
        help="Pull in this process into this machine's cache (HF_HOME), not on the appliance.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="With --local: the models.yaml that names NAME."
    ),
    url: str = URL_OPTION,
    api_key: str | None = KEY_OPTION,
) -> None:
    """Download a model's files from the hub (or the mirror in HF_ENDPOINT) ahead of loading.

    Honours HF_TOKEN (gated models) and HF_HUB_OFFLINE. Interrupted, it resumes: files already
    complete are kept, a dropped connection continues where it stopped.
    """
    try:
        if local:
            _pull_here(name, config)
        else:
            _pull_remote(name, url, api_key)
    except KeyboardInterrupt:
        err.print(f"interrupted: run the same command again to resume pulling {name}")
        raise typer.Exit(130) from None
