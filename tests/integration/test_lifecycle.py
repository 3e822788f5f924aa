"""Issue 3: load and unload at run time from the CLI, supervision, load on demand, reload.

One appliance for the module; the tests run in file order and each leaves it as the next
expects (noted at the top of each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import ApplianceProcess, tiny_chat, wait_until

pytestmark = pytest.mark.integration

ALPHA = tiny_chat("alpha", "llama")
BETA = tiny_chat("beta", "gpt2", autoload=False, load_on_demand=True)
GAMMA = tiny_chat("gamma", "mistral")


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """alpha autoloads; beta loads on demand."""
    proc = ApplianceProcess(tmp_path_factory.mktemp("lifecycle"), [ALPHA, BETA])
    proc.start(
        "--load-wait", "240", "--restart-backoff", "3", "--drain-timeout", "60", "--workers", "2"
    )
    yield proc
    proc.stop()


def cli(appliance: ApplianceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `appliance models ...` against ``appliance``."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args, "--url", appliance.url],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


def model_status(appliance: ApplianceProcess, name: str) -> dict[str, Any]:
    """One model's entry in GET /admin/models."""
    body = httpx.get(f"{appliance.url}/admin/models", timeout=10).json()
    return next(m for m in body["data"] if m["name"] == name)


def wait_state(appliance: ApplianceProcess, name: str, states: set[str], within: float) -> str:
    """Poll until ``name`` is in one of ``states``; fail after ``within`` seconds."""
    end = time.monotonic() + within
    state = ""
    while time.monotonic() < end:
        state = model_status(appliance, name)["state"]
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{name} still {state}, wanted {states}:\n{appliance.tail()}")


def chat(appliance: ApplianceProcess, model: str, timeout: float = 60) -> httpx.Response:
    """One short chat request."""
    return httpx.post(
        f"{appliance.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=timeout,
    )


class Stream(threading.Thread):
    """A long completion stream read in the background."""

    def __init__(self, appliance: ApplianceProcess, model: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{appliance.url}/v1/completions"
        self.body = {
            "model": model,
            "prompt": "go on",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.events: list[str] = []
        self.first = threading.Event()
        self.status = 0

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=300) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line)
                    self.first.set()

    def completed(self, tokens: int) -> bool:
        """Every token arrived (per the closing usage event), then [DONE], and no error.

        Events are not counted: under load vLLM puts several tokens in one event.
        """
        if self.status != 200 or self.events[-1:] != ["data: [DONE]"] or len(self.events) < 3:
            return False
        usage = json.loads(self.events[-2][len("data: ") :]).get("usage") or {}
        text_events = [json.loads(e[len("data: ") :]) for e in self.events[:-2]]
        return usage.get("completion_tokens") == tokens and all(
            "error" not in event for event in text_events
        )


class StreamLoop(threading.Thread):
    """Streams one request after another until told to stop; records whether each completed."""

    def __init__(self, appliance: ApplianceProcess, model: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.appliance, self.model, self.tokens = appliance, model, tokens
        self.stop = threading.Event()
        self.first = threading.Event()
        self.results: list[bool] = []
        self.failures: list[tuple[int, int, list[str]]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            stream = Stream(self.appliance, self.model, self.tokens)
            stream.run()
            self.results.append(stream.completed(self.tokens))
            if not self.results[-1]:
                self.failures.append((stream.status, len(stream.events), stream.events[-2:]))
            self.first.set()


def test_unload_with_cli_while_streaming_then_load_back(appliance: ApplianceProcess) -> None:
    # Starts: alpha ready. Leaves: alpha ready.
    stream = Stream(appliance, "alpha", 400)
    stream.start()
    assert stream.first.wait(60)
    unloading = subprocess.Popen(
        [sys.executable, "-m", "appliance", "models", "unload", "alpha", "--url", appliance.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_state(appliance, "alpha", {"draining", "unloaded"}, 30)
    if stream.is_alive():  # while draining, new requests are refused at once
        refused = chat(appliance, "alpha", timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] in ("model_draining", "model_unloaded")
        assert "retry-after" in refused.headers
    out, errors = unloading.communicate(timeout=120)
    assert unloading.returncode == 0, errors
    assert "alpha: unloaded" in out
    stream.join(30)
    assert stream.completed(400), stream.events[-3:]

    after = chat(appliance, "alpha", timeout=5)
    assert after.status_code == 503
    assert after.json()["error"]["code"] == "model_unloaded"
    assert int(after.headers["retry-after"]) >= 1
    assert "alpha" not in cli(appliance, "ps").stdout

    loaded = cli(appliance, "load", "alpha")
    assert loaded.returncode == 0, loaded.stderr
    assert "alpha: ready" in loaded.stdout
    assert chat(appliance, "alpha").status_code == 200
    listing = cli(appliance, "list")
    assert listing.returncode == 0 and "alpha" in listing.stdout and "ready" in listing.stdout
    ps = cli(appliance, "ps")
    assert "alpha" in ps.stdout and "beta" not in ps.stdout


def _engine_core_pids(appliance: ApplianceProcess) -> set[int]:
    pids = set()
    for pid in appliance.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            comm = Path(f"/proc/{pid}/comm").read_text()
        except OSError:
            continue
        if b"EngineCore" in cmdline or "EngineCor" in comm:
            pids.add(pid)
    return pids


def test_killed_engine_fails_then_restarts_by_itself(appliance: ApplianceProcess) -> None:
    # Starts: alpha ready, nothing else loaded. Leaves: alpha ready.
    cores = _engine_core_pids(appliance)
    assert len(cores) == 1, cores
    os.kill(cores.pop(), signal.SIGKILL)
    wait_state(appliance, "alpha", {"failed"}, 10)
    began = time.monotonic()
    refused = chat(appliance, "alpha", timeout=10)
    assert time.monotonic() - began < 2, "a failed model must answer at once"
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] in ("model_failed", "model_loading")
    wait_state(appliance, "alpha", {"ready"}, 240)
    assert chat(appliance, "alpha").status_code == 200
    status = model_status(appliance, "alpha")
    assert status["restarts"] == 0  # the count of consecutive failures resets once it is up
    log = appliance.log_path.read_text()
    assert '"to_state": "failed"' in log and "restart" in log


def test_load_on_demand(appliance: ApplianceProcess) -> None:
    # Starts: beta unloaded (load_on_demand). Leaves: beta ready.
    assert model_status(appliance, "beta")["state"] == "unloaded"
    answer = chat(appliance, "beta", timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "beta"
    assert model_status(appliance, "beta")["state"] == "ready"


def test_reload_adds_and_removes_while_a_third_streams(appliance: ApplianceProcess) -> None:
    # Starts: alpha and beta ready. Leaves: alpha and gamma ready, beta gone.
    alpha_before = model_status(appliance, "alpha")
    streams = StreamLoop(appliance, "alpha", 200)
    streams.start()
    assert streams.first.wait(60)
    appliance.write_config([ALPHA, GAMMA])
    reload = cli(appliance, "reload")
    streams.stop.set()
    streams.join(120)
    assert reload.returncode == 0, reload.stderr
    assert "added: gamma" in reload.stdout and "removed: beta" in reload.stdout
    assert "changed: -" in reload.stdout
    # alpha streamed all through the reload, every stream whole.
    assert len(streams.results) >= 2 and all(streams.results), streams.failures
    alpha_after = model_status(appliance, "alpha")
    assert alpha_after["state"] == "ready"
    # alpha was never touched: same engine, same load, state unchanged since before.
    assert alpha_after["load_seconds"] == alpha_before["load_seconds"]
    assert alpha_after["since_seconds"] > alpha_before["since_seconds"]
    assert chat(appliance, "gamma").status_code == 200
    gone = chat(appliance, "beta", timeout=5)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_invalid_reload_changes_nothing(appliance: ApplianceProcess) -> None:
    # Starts and leaves: alpha and gamma ready.
    appliance.config.write_text("models:\n  - name: alpha\n    sorce: nowhere\n")
    refused = cli(appliance, "reload")
    assert refused.returncode == 1
    assert "alpha" in refused.stderr and "sorce" in refused.stderr
    assert chat(appliance, "alpha").status_code == 200
    assert chat(appliance, "gamma").status_code == 200
    appliance.write_config([ALPHA, GAMMA])


def test_sighup_reloads(appliance: ApplianceProcess) -> None:
    # Starts: alpha and gamma ready. Leaves: alpha ready, gamma gone.
    appliance.write_config([ALPHA])
    assert appliance.proc is not None
    appliance.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: chat(appliance, "gamma", timeout=5).status_code == 404,
        "gamma is gone after SIGHUP",
        timeout=60,
    )
    assert chat(appliance, "alpha").status_code == 200


def test_admin_mistakes_are_clear(appliance: ApplianceProcess) -> None:
    missing = httpx.post(f"{appliance.url}/admin/models/nope/load", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    failed = cli(appliance, "load", "nope")
    assert failed.returncode == 1 and "nope" in failed.stderr
    sleeping = cli(appliance, "sleep", "alpha")
    assert sleeping.returncode == 1 and "needs a GPU" in sleeping.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "ps", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
