"""Issue 4: two appliances on loopback federated through the registry, and vLLM's own server
as a remote backend.

Appliance A serves a tiny model; the registry says that model lives at A's URL; appliance B
(configured with the registry, no engines of its own) proxies to A.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.integration.harness import (
    ApplianceProcess,
    free_port,
    tiny_chat,
    wait_until,
    wait_until_ok,
)
from tests.integration.vllm_reference import CHAT_MODEL

pytestmark = pytest.mark.integration

TOKEN = "registry-token-for-tests-32-characters"
MESSAGES = [{"role": "user", "content": "federate me"}]


class Registry:
    """`appliance registry serve` in a subprocess."""

    def __init__(self, workdir: Path) -> None:
        self.db = workdir / "registry.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "registry.log"

    def start(self) -> None:
        """Start and wait for /health."""
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "registry",
                "serve",
                "--db",
                str(self.db),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            # The token travels in the environment, never on the command line (issue 13).
            env={**os.environ, "APPLIANCE_REGISTRY_TOKEN": TOKEN},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_until_ok(f"{self.url}/health", self.proc, self.log, deadline=60)

    def put(self, entry: dict[str, Any]) -> None:
        """Create or replace one entry."""
        response = httpx.put(
            f"{self.url}/v1/registry/models/{entry['name']}",
            json=entry,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text

    def stop(self) -> None:
        """Terminate."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def boxes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ApplianceProcess, ApplianceProcess, Registry]]:
    """A serves tiny-chat; the registry points tiny-chat at A; B follows the registry."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    registry.start()
    # Both boxes with two HTTP workers (issue 16): B's workers pass remote entries to B's owner.
    a = ApplianceProcess(tmp_path_factory.mktemp("box-a"), [tiny_chat("tiny-chat")]).start(
        "--workers", "2"
    )
    registry.put({"name": "tiny-chat", "backend_url": a.url, "owner": "box-a", "version": "1"})
    # A is on loopback here, which registry entries may reach only when models.yaml says so.
    b = ApplianceProcess(
        tmp_path_factory.mktemp("box-b"),
        [],
        registry_url=registry.url,
        registry_ttl=1,
        registry_trust={"backend_networks": ["127.0.0.0/8"]},
    ).start("--workers", "2")
    yield a, b, registry
    b.stop()
    a.stop()
    registry.stop()


def completion(url: str, stream: bool) -> tuple[int, str]:
    """Greedy completion through ``url``: (status, text)."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    if not stream:
        reply = client.completions.create(
            model="tiny-chat",
            prompt="federation",
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return 200, reply.choices[0].text
    chunks = client.completions.create(
        model="tiny-chat",
        prompt="federation",
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return 200, "".join(c.choices[0].text for c in chunks if c.choices)


def test_b_answers_with_a_tokens(
    boxes: tuple[ApplianceProcess, ApplianceProcess, Registry],
) -> None:
    a, b, _ = boxes
    for stream in (False, True):
        assert completion(b.url, stream) == completion(a.url, stream)
    chat_a = OpenAI(base_url=f"{a.url}/v1", api_key="x").chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    chat_b = OpenAI(base_url=f"{b.url}/v1", api_key="x").chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat_b.choices[0].message.content == chat_a.choices[0].message.content
    models = httpx.get(f"{b.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny-chat"] and models[0]["backend_url"] == a.url
    status = httpx.get(f"{b.url}/admin/registry").json()
    assert status["configured"] and status["up"] and status["source"] == "registry"
    # The request id travels to A.
    r = httpx.post(
        f"{b.url}/v1/completions",
        json={"model": "tiny-chat", "prompt": "x", "max_tokens": 2},
        headers={"X-Request-Id": "fed-42"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "fed-42"
    assert '"request_id": "fed-42"' in a.log_path.read_text()


def test_b_keeps_serving_without_the_registry(
    boxes: tuple[ApplianceProcess, ApplianceProcess, Registry],
) -> None:
    a, b, registry = boxes
    registry.stop()

    def registry_status() -> dict[str, Any]:
        return httpx.get(f"{b.url}/admin/registry").json()  # type: ignore[no-any-return]

    wait_until(lambda: registry_status()["up"] is False, "B sees the registry down", timeout=15)
    status = registry_status()
    assert status["up"] is False and status["source"] == "registry_cache"
    assert completion(b.url, False) == completion(a.url, False)


def test_b_fails_fast_while_a_is_down_and_recovers(
    boxes: tuple[ApplianceProcess, ApplianceProcess, Registry],
) -> None:
    a, b, _ = boxes
    expected = completion(a.url, False)
    assert a.stop() == 0
    began = time.monotonic()
    r = httpx.post(
        f"{b.url}/v1/completions",
        json={"model": "tiny-chat", "prompt": "x", "max_tokens": 2},
        timeout=30,
    )
    assert time.monotonic() - began < 2.0
    assert r.status_code in (502, 503)
    error = r.json()["error"]
    assert a.url in error["message"] and "tiny-chat" in error["message"]
    a.start()  # same port
    replies: list[httpx.Response] = []

    def b_answers() -> bool:
        replies.append(
            httpx.post(
                f"{b.url}/v1/completions",
                json={
                    "model": "tiny-chat",
                    "prompt": "federation",
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                timeout=30,
            )
        )
        return replies[-1].status_code == 200

    wait_until(b_answers, "B answers again once A is back", timeout=60)
    r = replies[-1]
    assert r.status_code == 200, r.text
    assert (200, r.json()["choices"][0]["text"]) == expected


def test_vllm_own_server_as_a_backend(workdir: Path, module_chat_reference: str) -> None:
    # The session's reference `vllm serve` of the tiny chat model, behind a remote entry.
    backend = module_chat_reference
    proxy = ApplianceProcess(
        workdir, [{"name": "vllm-chat", "backend_url": backend, "backend_model": CHAT_MODEL}]
    )
    try:
        proxy.start()
        direct = OpenAI(base_url=f"{backend}/v1", api_key="x")
        through = OpenAI(base_url=f"{proxy.url}/v1", api_key="x")
        kwargs: dict[str, Any] = {
            "prompt": "proxied",
            "max_tokens": 10,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        expected = direct.completions.create(model=CHAT_MODEL, **kwargs).choices[0].text
        assert through.completions.create(model="vllm-chat", **kwargs).choices[0].text == expected
        streamed = through.completions.create(model="vllm-chat", **kwargs, stream=True)
        text = "".join(c.choices[0].text for c in streamed if c.choices)
        assert text == expected
        bad = httpx.post(
            f"{proxy.url}/v1/completions",
            json={"model": "vllm-chat", "prompt": "x", "temperature": -1},
            timeout=30,
        )
        assert bad.status_code == 400 and "error" in bad.json()
    finally:
        proxy.stop()
