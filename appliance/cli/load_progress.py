"""How the CLI shows a load under way: the download's progress, then the engine's start."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from appliance.hub.pull import format_bytes

POLL_SECONDS = 0.5


class StatusSource(Protocol):
    """What ``follow_load`` polls (``AdminClient``)."""

    def call(self, method: str, path: str, *, timeout: float | None = None) -> dict[str, Any]:
        """One admin API call."""
        ...


def describe_state(model: dict[str, Any]) -> str:
    """``ready``, or ``downloading 45% (1.2 GB of 2.6 GB, 1 min left)`` while it downloads,
    or ``converting GGUF (dequantizing the weights)`` while a .gguf source is converted."""
    state = str(model.get("state") or "-")
    download = model.get("download")
    if state != "downloading" or not isinstance(download, dict):
        return state
    if download.get("activity") == "converting":
        return f"converting GGUF ({download.get('detail') or 'starting'})"
    done, total = int(download.get("done_bytes") or 0), int(download.get("total_bytes") or 0)
    if not total:
        return state
    text = f"downloading {100 * done / total:.0f}% ({format_bytes(done)} of {format_bytes(total)}"
    left = download.get("seconds_left")
    if isinstance(left, (int, float)):
        text += f", {left / 60:.0f} min left" if left >= 90 else f", {left:.0f}s left"
    return text + ")"


def describe_times(model: dict[str, Any]) -> str:
    """``31.2s``, or ``31.2s (wake 0.9s)`` once it has woken from sleep: what each tier costs
    to bring back."""
    load, wake = model.get("load_seconds"), model.get("wake_seconds")
    text = f"{load:.1f}s" if isinstance(load, (int, float)) and load else "-"
    if isinstance(wake, (int, float)) and wake:
        text += f" (wake {wake:.1f}s)"
    return text


def follow_load(
    name: str, action: Callable[[], dict[str, Any]], status: StatusSource, console: Console
) -> dict[str, Any]:
    """Run the (blocking) load request; meanwhile poll the model's status into a spinner."""
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.update(action())
        except BaseException as exc:  # typer.Exit carries the CLI's message and exit code
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"loading {name}", total=None)
        worker.start()
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if not worker.is_alive():
                break
            try:
                model = status.call("GET", f"/admin/models/{name}/status", timeout=5)
            except BaseException:  # a poll that fails changes nothing; the load decides
                continue
            progress.update(task, description=f"{name}: {describe_state(model)}")
    if failure:
        raise failure[0]
    return result
