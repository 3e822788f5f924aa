"""Issue 27: the Batch API through the OpenAI SDK against a real appliance and real vLLM:
output equal to the same requests answered online, cancel, ownership, bad input, and a
restart mid-batch that loses no line and answers none twice; per-key queue metrics.

One small appliance of its own (keys, and a restart the shared one must not see)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from tests.integration.harness import ApplianceProcess, tiny_chat, wait_until

KEYS = {
    "team": "sk-team-batches-0123456789abcdef0123456789",
    "other": "sk-other-batches-0123456789abcdef0123456789",
    "ops": "sk-ops-batches-0123456789abcdef0123456789",
}
FINISHED = ("completed", "failed", "expired", "cancelled")
FILE_CAP = 64 * 1024
RESTART_LINES = 60


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    workdir = tmp_path_factory.mktemp("batches")
    keys = workdir / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "team", "key": KEYS["team"], "priority": 0},
                    {"name": "other", "key": KEYS["other"]},
                    {"name": "ops", "key": KEYS["ops"], "role": "admin"},
                ]
            }
        )
    )
    keys.chmod(0o600)
    # Two places in the engine: batch lines queue in the appliance's own fair queue.
    model = tiny_chat("tiny-chat", max_in_engine=2)
    model["engine"]["scheduling_policy"] = "priority"
    # No torch.compile: this module starts its engine twice, on a busy 2-core box.
    model["engine"]["enforce_eager"] = True
    proc = ApplianceProcess(workdir, [model])
    proc.start(*appliance_args(proc))
    yield proc
    proc.stop()


def sdk(appliance: ApplianceProcess, key: str) -> OpenAI:
    return OpenAI(base_url=f"{appliance.url}/v1", api_key=KEYS[key], max_retries=0)


def chat_line(n: int, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": f"count to {n}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", data), purpose="batch").id


def start_batch(client: OpenAI, lines: list[dict[str, Any]]) -> str:
    file_id = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating" and batch.input_file_id == file_id
    return batch.id


def finished(client: OpenAI, batch_id: str, timeout: float = 300.0) -> Any:
    wait_until(lambda: client.batches.retrieve(batch_id).status in FINISHED, batch_id, timeout)
    return client.batches.retrieve(batch_id)


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


def test_batch_output_equals_the_same_requests_answered_online(
    appliance: ApplianceProcess,
) -> None:
    client = sdk(appliance, "team")
    lines = [chat_line(n) for n in range(4)]
    batch = finished(client, start_batch(client, lines))
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (4, 4)
    assert batch.error_file_id is None
    results = lines_of(client, batch.output_file_id)
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in lines]
    for line, result in zip(lines, results, strict=True):
        assert result["response"]["status_code"] == 200
        online = client.chat.completions.create(**line["body"])
        body = result["response"]["body"]
        assert [c["message"]["content"] for c in body["choices"]] == [
            c.message.content for c in online.choices
        ]
        assert body["usage"]["completion_tokens"] == online.usage.completion_tokens  # type: ignore[union-attr]
    assert batch.id in [b.id for b in client.batches.list()]
    # The lines went through the same admission as online requests, counted per key.
    metrics = httpx.get(
        f"{appliance.url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}
    ).text
    admitted = [
        line
        for line in metrics.splitlines()
        if line.startswith("appliance_key_admitted_total") and 'key="team"' in line
    ]
    assert admitted and float(admitted[0].rsplit(" ", 1)[1]) >= 8, admitted


def test_another_key_gets_404_and_bad_input_is_a_clear_4xx(appliance: ApplianceProcess) -> None:
    team = sdk(appliance, "team")
    other = sdk(appliance, "other")
    batch_id = start_batch(team, [chat_line(0)])
    input_id = team.batches.retrieve(batch_id).input_file_id
    for call in (
        lambda: other.batches.retrieve(batch_id),
        lambda: other.batches.cancel(batch_id),
        lambda: other.files.retrieve(input_id),
        lambda: other.files.content(input_id),
        lambda: other.batches.create(
            input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch_id not in [b.id for b in other.batches.list()]

    with pytest.raises(openai.BadRequestError, match="purpose"):
        team.files.create(file=("x.jsonl", b'{"a": 1}\n'), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        team.files.create(file=("x.jsonl", b'{"a": 1}\n{"b": \n'), purpose="batch")
    with pytest.raises(openai.APIStatusError) as over:
        team.files.create(file=("x.jsonl", b"{}\n" * FILE_CAP), purpose="batch")
    assert over.value.status_code == 413
    unknown = upload(team, [chat_line(0), {**chat_line(1), "body": {"model": "no-such"}}])
    with pytest.raises(openai.BadRequestError, match=r"line 2.*no-such"):
        team.batches.create(
            input_file_id=unknown, endpoint="/v1/chat/completions", completion_window="24h"
        )
    # Others are still served, and the first batch still completes.
    assert team.chat.completions.create(**chat_line(0)["body"]).choices
    assert finished(team, batch_id).status == "completed"


def test_cancel_stops_the_lines_not_yet_run(appliance: ApplianceProcess) -> None:
    client = sdk(appliance, "team")
    lines = [chat_line(n, max_tokens=64, ignore_eos=True) for n in range(30)]
    batch_id = start_batch(client, lines)
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = finished(client, batch_id)
    assert batch.status == "cancelled", batch
    counts = batch.request_counts
    assert counts is not None and counts.completed + counts.failed == 30
    assert counts.completed < 30
    errors = lines_of(client, batch.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}


def test_a_restart_mid_batch_loses_no_line_and_answers_none_twice(
    appliance: ApplianceProcess,
) -> None:
    client = sdk(appliance, "team")
    lines = [chat_line(n, max_tokens=96, ignore_eos=True) for n in range(RESTART_LINES)]
    batch_id = start_batch(client, lines)

    def some_done() -> bool:
        counts = client.batches.retrieve(batch_id).request_counts
        return counts is not None and counts.completed >= 2

    wait_until(some_done, "two lines answered", timeout=300)
    appliance.stop()
    with sqlite3.connect(appliance.workdir / "batches.db") as db:
        (recorded,) = db.execute(
            "SELECT COUNT(*) FROM results WHERE batch_id = ?", (batch_id,)
        ).fetchone()
    assert 2 <= recorded < RESTART_LINES  # stopped mid-batch
    appliance.start(*appliance_args(appliance))
    client = sdk(appliance, "team")
    batch = finished(client, batch_id, timeout=600)
    assert batch.status == "completed", batch
    results = lines_of(client, batch.output_file_id)
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # none lost or twice
    assert len({r["id"] for r in results}) == RESTART_LINES
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 96 for r in results)


def appliance_args(appliance: ApplianceProcess) -> tuple[str, ...]:
    # A small file cap, under the request body limit: the appliance's own 413 answers it.
    keys = str(appliance.workdir / "keys.yaml")
    return ("--api-keys", keys, "--batch-max-file-bytes", str(FILE_CAP))
