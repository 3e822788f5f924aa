"""The Files and Batch APIs and priorities over the whole HTTP app on a test engine, through
the OpenAI SDK (real vLLM: ``tests/integration/test_batches.py``)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api_keys import PRIORITY_LAST, ApiKey
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.host.inventory import cpu_inventory
from tests.fakes import EchoEngine, OneEngineMaker
from tests.unit.fast_app import fast_settings

TEAM = "sk-team-0123456789abcdef0123456789"
OTHER = "sk-other-0123456789abcdef0123456789"


class RecordingEngine(EchoEngine):
    """Echoes the prompt back, and keeps every body it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        self.bodies.append(dict(body))
        answer = {"model": body["model"], "object": "text_completion", "echo": body["prompt"]}
        return JSONReply(200, json.dumps(answer).encode())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, RecordingEngine]]:
    entry = {"name": "tiny", "source": "org/tiny", "resources": {"memory_gib": 1}}
    keys = [
        ApiKey.model_validate({"name": "team", "key": TEAM, "priority": 3}),
        ApiKey.model_validate({"name": "other", "key": OTHER}),
    ]
    settings = fast_settings(tmp_path, [entry], keys)
    maker = OneEngineMaker(RecordingEngine())
    built = create_app(settings, engines=maker, inventory=cpu_inventory(4))
    with TestClient(built) as client:
        client.portal.call(built.state.appliance.supervisor.wait_autoload)  # type: ignore[union-attr]
        yield client, maker.engine


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def line(n: int, model: str = "tiny", url: str = "/v1/completions") -> dict[str, Any]:
    body = {"model": model, "prompt": f"p{n}", "max_tokens": 4, "temperature": 0}
    return {"custom_id": f"r{n}", "method": "POST", "url": url, "body": body}


def test_a_batch_runs_through_the_sdk_as_online_requests_would(
    app: tuple[TestClient, RecordingEngine],
) -> None:
    client, engine = app
    team = sdk(client, TEAM)
    uploaded = team.files.create(
        file=("in.jsonl", jsonl([line(n) for n in range(3)])), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = team.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 20
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
        batch = team.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None and batch.request_counts.completed == 3
    assert batch.output_file_id is not None and batch.error_file_id is None
    results = [json.loads(x) for x in team.files.content(batch.output_file_id).text.splitlines()]
    online = team.completions.create(model="tiny", prompt="p0", max_tokens=4, temperature=0)
    assert [r["custom_id"] for r in results] == ["r0", "r1", "r2"]
    assert results[0]["response"]["body"] == online.model_dump(exclude_unset=True)
    # Online requests run at their key's priority, batch lines at the least urgent.
    priorities = sorted(body["priority"] for body in engine.bodies)
    assert priorities == [3, PRIORITY_LAST, PRIORITY_LAST, PRIORITY_LAST]
    assert [b.id for b in team.batches.list()] == [batch.id]

    other = sdk(client, OTHER)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(batch.output_file_id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert list(other.batches.list()) == []


def test_bad_batch_input_is_a_clear_4xx(app: tuple[TestClient, RecordingEngine]) -> None:
    client, _ = app
    team = sdk(client, TEAM)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        team.files.create(file=("x.jsonl", jsonl([line(0)])), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        team.files.create(file=("x.jsonl", jsonl([line(0)]) + b"{nope\n"), purpose="batch")
    with pytest.raises(openai.APIStatusError) as big:
        team.files.create(file=("x.jsonl", io.BytesIO(b" " * (9 * 2**20))), purpose="batch")
    assert big.value.status_code == 413
    unknown = team.files.create(
        file=("x.jsonl", jsonl([line(0), line(1, "nope")])), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError, match=r"line 2 .*'nope'"):
        team.batches.create(
            input_file_id=unknown.id, endpoint="/v1/completions", completion_window="24h"
        )
    wrong_url = team.files.create(
        file=("x.jsonl", jsonl([line(0, url="/v1/embeddings")])), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError, match="url"):
        team.batches.create(
            input_file_id=wrong_url.id, endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        team.batches.create(
            input_file_id=wrong_url.id,
            endpoint="/v1/completions",
            completion_window="soon",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError):
        team.batches.create(
            input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"
        )
    # A form posted without a key (what a web page can send cross-site) is refused.
    form = client.post("/v1/files", files={"file": ("x", b"{}")}, data={"purpose": "batch"})
    assert form.status_code == 415


def test_a_request_may_lower_its_priority_within_its_keys_bounds(
    app: tuple[TestClient, RecordingEngine],
) -> None:
    client, engine = app
    team = sdk(client, TEAM)
    team.completions.create(model="tiny", prompt="x", extra_body={"priority": 9})
    assert engine.bodies[-1]["priority"] == 9
    with pytest.raises(openai.BadRequestError, match="priority"):
        team.completions.create(model="tiny", prompt="x", extra_body={"priority": 0})
