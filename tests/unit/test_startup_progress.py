"""What `appliance up` draws on a terminal while models load."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from io import StringIO

from rich.console import Console

from appliance.cli.startup_progress import StartupProgress, render
from appliance.host.downloads import DownloadProgress
from appliance.supervisor.states import ModelState


@dataclass
class FakeSpec:
    autoload: bool = True


@dataclass
class FakeLifecycle:
    since: float


@dataclass
class FakeHandle:
    name: str
    state: ModelState
    lifecycle: FakeLifecycle = field(default_factory=lambda: FakeLifecycle(100.0))
    spec: FakeSpec = field(default_factory=FakeSpec)
    load_seconds: float | None = None
    last_error: str | None = None
    download: DownloadProgress | None = None


class FakeSupervisor:
    def __init__(self, handles: list[FakeHandle]) -> None:
        self._handles = handles
        self.loaded = asyncio.Event()

    def handles(self) -> list[FakeHandle]:
        return self._handles

    async def wait_autoload(self) -> None:
        await self.loaded.wait()


def text_of(renderable: object) -> str:
    console = Console(file=StringIO(), width=120, color_system=None)
    console.print(renderable)
    # Columns are padded to the widest cell: compare with single spaces.
    return re.sub(r" +", " ", console.file.getvalue())  # type: ignore[attr-defined]


def test_lines_per_state() -> None:
    supervisor = FakeSupervisor(
        [
            FakeHandle("chat", ModelState.LOADING),
            FakeHandle("embed", ModelState.READY, load_seconds=12.34),
            FakeHandle("broken", ModelState.FAILED, last_error="out of memory"),
            FakeHandle("spare", ModelState.UNLOADED, spec=FakeSpec(autoload=False)),
        ]
    )
    text = text_of(render(supervisor, now=142.0))  # type: ignore[arg-type]
    assert "chat loading 42s" in text
    assert "✓ embed ready 12.3s" in text
    assert "✗ broken failed out of memory" in text
    assert "spare" not in text  # not autoloaded and not loading: nothing to show


def test_a_gguf_conversion_shows_its_step() -> None:
    converting = DownloadProgress(activity="converting", detail="dequantizing the weights")
    supervisor = FakeSupervisor(
        [FakeHandle("smollm2", ModelState.DOWNLOADING, download=converting)]
    )
    text = text_of(render(supervisor, now=107.0))  # type: ignore[arg-type]
    assert "smollm2 converting GGUF dequantizing the weights 7s" in text


def test_remote_entries_are_not_drawn() -> None:
    from appliance.catalogue.schema import RemoteModelSpec

    far = RemoteModelSpec(name="far", backend_url="http://box-a:8000")
    supervisor = FakeSupervisor(
        [FakeHandle("chat", ModelState.LOADING), FakeHandle("far", ModelState.READY, spec=far)]  # type: ignore[arg-type]
    )
    text = text_of(render(supervisor, now=142.0))  # type: ignore[arg-type]
    assert "chat loading" in text and "far" not in text


def test_draws_until_the_autoload_ends() -> None:
    handle = FakeHandle("chat", ModelState.LOADING)
    supervisor = FakeSupervisor([handle])
    out = StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)

    async def run() -> None:
        view = asyncio.ensure_future(StartupProgress(console)(supervisor))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let it draw the loading line
        handle.state = ModelState.READY
        handle.load_seconds = 3.0
        supervisor.loaded.set()
        await asyncio.wait_for(view, 10)

    asyncio.run(run())
    assert "✓ chat ready 3.0s" in re.sub(r" +", " ", out.getvalue())
