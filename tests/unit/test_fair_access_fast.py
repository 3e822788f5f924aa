"""Fair share and priority through the whole app on a test engine: a key's request passes a
flooding key's backlog at a model with one place in its engine (``api.fair_access``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import ApiKey
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.host.inventory import cpu_inventory
from tests.fakes import EchoEngine, OneEngineMaker
from tests.unit.fast_app import fast_settings

KEYS = {
    "flood": "sk-flood-0123456789abcdef0123456789",
    "chat": "sk-chat-0123456789abcdef0123456789",
    "urgent": "sk-urgent-0123456789abcdef012345678",
    "ops": "sk-ops-0123456789abcdef0123456789abc",
}


class SlowEngine(EchoEngine):
    """Holds its first request until ``release``; notes the order requests reached it in."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.held = asyncio.Event()

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        self.order.append(str(body.get("prompt")))
        if len(self.order) == 1:
            await self.held.wait()
        return JSONReply(200, json.dumps({"model": body["model"]}).encode())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, SlowEngine]]:
    entry = {"name": "one", "source": "org/one", "resources": {"memory_gib": 1}}
    keys = [
        ApiKey.model_validate({"name": "flood", "key": KEYS["flood"]}),
        ApiKey.model_validate({"name": "chat", "key": KEYS["chat"]}),
        ApiKey.model_validate({"name": "urgent", "key": KEYS["urgent"], "priority": -1}),
        ApiKey.model_validate({"name": "ops", "key": KEYS["ops"], "role": "admin"}),
    ]
    settings = fast_settings(tmp_path, [{**entry, "max_in_engine": 1}], keys)
    maker = OneEngineMaker(SlowEngine())
    built = create_app(settings, engines=maker, inventory=cpu_inventory(4))
    with TestClient(built) as client:
        client.portal.call(built.state.appliance.supervisor.wait_autoload)  # type: ignore[union-attr]
        yield client, maker.engine


def send(client: TestClient, key: str, tag: str) -> int:
    body = {"model": "one", "prompt": tag, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    return client.post("/v1/completions", json=body, headers=headers).status_code


def test_a_key_passes_a_floods_backlog_and_priority_passes_both(
    app: tuple[TestClient, SlowEngine],
) -> None:
    client, engine = app
    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(send, client, "flood", "f0")]
        deadline = time.monotonic() + 5
        while len(engine.order) < 1:  # the first flood request holds the one place
            assert time.monotonic() < deadline
            time.sleep(0.01)
        flood += [pool.submit(send, client, "flood", f"f{n}") for n in range(1, 6)]
        time.sleep(0.3)  # the rest of the flood queues behind it
        chat = pool.submit(send, client, "chat", "c0")
        time.sleep(0.2)
        urgent = pool.submit(send, client, "urgent", "u0")
        time.sleep(0.2)
        client.portal.call(engine.held.set)  # type: ignore[union-attr]
        statuses = [f.result() for f in (*flood, chat, urgent)]
    assert statuses == [200] * 8
    # The urgent key first (priority), then the chat key (its fair share), then the flood.
    assert engine.order[1:3] == ["u0", "c0"], engine.order
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text
    assert 'appliance_key_admitted_total{key="flood",model="one"} 6.0' in metrics
    assert 'appliance_key_queue_wait_seconds_count{key="chat",model="one"} 1.0' in metrics


def test_a_keys_priority_reaches_a_raw_route_and_a_default_one_leaves_its_bytes_alone(
    app: tuple[TestClient, SlowEngine],
) -> None:
    client, engine = app
    client.portal.call(engine.held.set)  # type: ignore[union-attr]
    raw = b'{"model": "one",  "input": "hi"}'
    for key in ("urgent", "chat"):
        headers = {"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json"}
        assert client.post("/v1/responses", content=raw, headers=headers).status_code == 200
    urgent, chat = engine.calls[-2:]
    # The urgent key's priority differs from vLLM's default: the body is re-encoded with it.
    assert json.loads(urgent.body) == {"model": "one", "input": "hi", "priority": -1}
    # The chat key's is vLLM's default: the client's own bytes go on, as they came.
    assert chat.body == raw
