"""Issue 2: SIGTERM during a request: in-flight work finishes, the process exits in bounds,
and no engine process is left behind."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import ApplianceProcess, alive, tiny_chat, wait_until

pytestmark = pytest.mark.integration

LONG_STREAM = {
    "model": "tiny-chat",
    "prompt": "a long answer",
    "max_tokens": 200,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def assert_finished(received: list[str]) -> None:
    """The stream in flight was allowed to finish: 200 tokens and the closing [DONE]."""
    assert received[-1] == "data: [DONE]"
    assert json.loads(received[-2][len("data: ") :])["usage"]["completion_tokens"] == 200


def test_sigterm_during_a_stream(workdir: Path) -> None:
    appliance = ApplianceProcess(workdir, [tiny_chat()]).start()
    engine_processes = appliance.descendants()
    assert engine_processes, "vLLM should run its engine in child processes"
    received: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{appliance.url}/v1/completions", json=LONG_STREAM, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60), appliance.tail()
    began = time.monotonic()
    try:
        code = appliance.stop(timeout=60)
    finally:
        reader.join(30)
    took = time.monotonic() - began
    assert code == 0, appliance.tail()
    assert took < 60
    assert_finished(received)
    wait_until(
        lambda: not any(alive(pid) for pid in engine_processes),
        "no engine process left behind",
        timeout=10,
    )


def test_sigterm_during_a_stream_on_a_worker(workdir: Path) -> None:
    """With HTTP workers (issue 16): a stream a worker serves finishes too, then all exit."""
    appliance = ApplianceProcess(workdir, [tiny_chat()]).start("--workers", "2")
    below = appliance.descendants()
    received: list[str] = []
    on_worker = threading.Event()
    done = threading.Event()

    def stream() -> None:
        # New connections until the worker (not the owner) takes one; the others are dropped.
        for _ in range(200):
            with (
                httpx.Client(timeout=120) as client,
                client.stream(
                    "POST", f"{appliance.url}/v1/completions", json=LONG_STREAM
                ) as response,
            ):
                if response.headers.get("x-appliance-worker") != "1":
                    continue
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.append(line)
                        on_worker.set()
                done.set()
                return

    reader = threading.Thread(target=stream)
    reader.start()
    assert on_worker.wait(180), appliance.tail()
    try:
        code = appliance.stop(timeout=60)
    finally:
        reader.join(30)
    assert code == 0, appliance.tail()
    assert done.is_set()
    assert_finished(received)
    wait_until(
        lambda: not any(alive(pid) for pid in below),
        "no worker or engine process left behind",
        timeout=15,
    )
