"""What ``appliance up`` shows on a terminal while its models load: one line per model, with
a spinner and the time so far, then how it ended. Off a terminal nothing is drawn and the logs
stay JSON lines; on one, log records are printed through the same console, above the lines.
"""

from __future__ import annotations

import asyncio
import logging
import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from appliance.catalogue.schema import RemoteModelSpec
from appliance.supervisor.handle import ModelHandle
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor

REFRESH_SECONDS = 0.1  # how often the lines are redrawn; the spinner's own pace is rich's


def log_to_console(console: Console, level: str) -> None:
    """Send log records to ``console`` as readable lines (a terminal), not JSON."""
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _line(handle: ModelHandle, now: float) -> tuple[RenderableType, str, str, str]:
    state = handle.state
    if state is ModelState.READY:
        took = f"{handle.load_seconds:.1f}s" if handle.load_seconds else ""
        return Text("✓", style="green"), handle.name, "ready", took
    if state is ModelState.FAILED:
        return Text("✗", style="red"), handle.name, "failed", (handle.last_error or "")[:80]
    elapsed = f"{now - handle.lifecycle.since:.0f}s"
    if state is ModelState.LOADING:
        return Spinner("dots"), handle.name, "loading", elapsed
    if state is ModelState.DOWNLOADING and handle.download is not None:
        if handle.download.activity == "converting":
            step = handle.download.detail or "starting"
            return Spinner("dots"), handle.name, "converting GGUF", f"{step} {elapsed}"
        done, total = handle.download.done_bytes, handle.download.total_bytes
        share = f"{100 * done / total:.0f}% of {total / 1e9:.1f} GB" if total else ""
        return Spinner("dots"), handle.name, "downloading", f"{share} {elapsed}".strip()
    return Text("·"), handle.name, state.value, ""


def render(supervisor: Supervisor, now: float | None = None) -> RenderableType:
    """One line per autoload model: mark (spinner while loading), name, state, time."""
    moment = time.monotonic() if now is None else now
    table = Table.grid(padding=(0, 1))
    for _ in range(4):
        table.add_column()
    for handle in supervisor.handles():
        if isinstance(handle.spec, RemoteModelSpec):
            continue  # a remote backend has nothing to load here
        if handle.spec.autoload or handle.state is not ModelState.UNLOADED:
            table.add_row(*_line(handle, moment))
    return Group(Text("loading models", style="bold"), table)


class StartupProgress:
    """A ``StartupView``: draws the loads until every autoload model is ready or failed."""

    def __init__(self, console: Console) -> None:
        self.console = console

    async def __call__(self, supervisor: Supervisor) -> None:
        """Draw until the autoload is over, then leave the final lines on the screen."""
        done = asyncio.ensure_future(supervisor.wait_autoload())
        live = Live(render(supervisor), console=self.console, refresh_per_second=10)
        with live:
            try:
                while not done.done():
                    live.update(render(supervisor))
                    await asyncio.wait({done}, timeout=REFRESH_SECONDS)
            finally:
                done.cancel()
                live.update(render(supervisor))
