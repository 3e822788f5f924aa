"""Headless Chromium driven over the DevTools protocol: just enough to test the status page.

No browser-automation package is needed: Chromium is started with a debugging port, and its
JSON-over-WebSocket protocol is spoken with ``websockets`` (already installed with uvicorn).
``find_chromium`` returns None where no Chromium is installed, so tests can skip with a reason.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
START_DEADLINE = 60.0


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) on PATH, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one page (tab), driven over CDP."""

    def __init__(self, executable: str) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="appliance-chromium-")
        self._proc = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",  # tests may run as root in a container
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._debugging_port()
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p.get("type") == "page")
        self._stack = contextlib.ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None)
        )
        self._ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _debugging_port(self) -> int:
        """Chromium writes the port it chose into the profile once it listens."""
        marker = Path(self._profile.name) / "DevToolsActivePort"
        end = time.monotonic() + START_DEADLINE
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode}")
            if marker.exists():
                first = marker.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            time.sleep(0.05)
        raise TimeoutError(f"chromium did not open its debugging port in {START_DEADLINE}s")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call one CDP method and return its result (events on the way are dropped)."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=120))
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message.get("result", {})  # type: ignore[no-any-return]

    def goto(self, url: str) -> None:
        """Open ``url`` in the page."""
        self.send("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited) and return its value."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; return that value, or fail after
        ``timeout`` seconds with the last value seen."""
        end = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < end:
            try:
                value = self.js(expression)
            except RuntimeError as exc:  # the page may be between two documents
                value = str(exc)
            else:
                if value:
                    return value
            time.sleep(0.1)
        raise AssertionError(f"{what or expression}: not true after {timeout}s (last: {value!r})")

    def screenshot(self, path: Path) -> Path:
        """Save the page as a PNG at ``path``."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        """Close the connection and stop Chromium."""
        try:
            self._stack.close()
        finally:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._profile.cleanup()
