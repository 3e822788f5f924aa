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


def test_sigterm_during_a_stream(workdir: Path) -> None:
    appliance = ApplianceProcess(workdir, [tiny_chat()]).start()
    engine_processes = appliance.descendants()
    assert engine_processes, "vLLM should run its engine in child processes"
    received: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {
            "model": "tiny-chat",
            "prompt": "a long answer",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{appliance.url}/v1/completions", json=body, timeout=120
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
    # The stream in flight was allowed to finish: 200 tokens and the closing [DONE].
    assert received[-1] == "data: [DONE]"
    assert json.loads(received[-2][len("data: ") :])["usage"]["completion_tokens"] == 200
    wait_until(
        lambda: not any(alive(pid) for pid in engine_processes),
        "no engine process left behind",
        timeout=10,
    )
