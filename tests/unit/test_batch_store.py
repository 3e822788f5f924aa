"""The batch store and runner (``appliance.batches``), run against a small ASGI app."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from appliance.batches.runner import BatchRunner
from appliance.batches.settings import BATCH_SCOPE, BatchSettings
from appliance.batches.store import BatchStatus, BatchStore

SECRET = "sk-0123456789abcdef0123456789abcdef"


class Answers:
    """Answers each request with its body's ``tag``; holds requests whose tag is in
    ``held`` until ``release`` is set; 429 for the first ``busy`` requests."""

    def __init__(self, held: set[str] = frozenset(), busy: int = 0) -> None:  # type: ignore[assignment]
        self.seen: Counter[str] = Counter()
        self.scopes: list[Scope] = []
        self.held = held
        self.release = asyncio.Event()
        self.busy = busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        tag = json.loads(body)["tag"]
        self.scopes.append(scope)
        if self.busy:
            self.busy -= 1
            await self._send(send, 429, {"error": {"code": "rate_limited"}}, retry="0")
            return
        if tag in self.held:
            await self.release.wait()
        self.seen[tag] += 1
        status = 400 if tag == "bad" else 200
        await self._send(send, status, {"tag": tag, "auth": _auth(scope)})

    @staticmethod
    async def _send(send: Send, status: int, body: Any, retry: str | None = None) -> None:
        headers = [(b"content-type", b"application/json")]
        if retry is not None:
            headers.append((b"retry-after", retry.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def _auth(scope: Scope) -> str:
    return dict(scope["headers"]).get(b"authorization", b"").decode()


def input_file(tags: list[str]) -> bytes:
    lines = [
        {"custom_id": f"c-{tag}", "method": "POST", "url": "/v1/completions", "body": {"tag": tag}}
        for tag in tags
    ]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def make_batch(store: BatchStore, tags: list[str], window: float = 3600.0) -> str:
    file = store.add_file("team", "in.jsonl", "batch", input_file(tags))
    return store.add_batch(
        owner="team",
        peer={"client": ["10.0.0.5", 4000], "host": "box"},
        endpoint="/v1/completions",
        input_file_id=file.id,
        completion_window="1h",
        window_seconds=window,
        total=len(tags),
        metadata=None,
    ).id


def output_of(store: BatchStore, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    record = store.file("team", file_id)
    assert record is not None
    return [json.loads(line) for line in store.content(record).decode().splitlines()]


async def wait_status(store: BatchStore, batch_id: str, status: BatchStatus) -> None:
    for _ in range(500):
        record = store.batch("team", batch_id)
        if record is not None and record.status is status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch never got to {status}: {store.batch('team', batch_id)}")


def runner_of(store: BatchStore, app: Answers, at_once: int = 2) -> BatchRunner:
    runner = BatchRunner(store, BatchSettings(lines_at_once=at_once), {"team": SECRET})
    runner.bind(app)
    return runner


def test_a_restart_redoes_only_the_unanswered_lines(tmp_path: Path) -> None:
    async def main() -> None:
        store = BatchStore(tmp_path / "b.db", tmp_path / "files")
        tags = ["a", "b", "c", "d", "bad"]
        batch_id = make_batch(store, tags)
        first = Answers(held={"c", "d"})
        runner = runner_of(store, first)
        await runner.start()
        for _ in range(500):
            if len(store.answered_lines(batch_id)) == 2:
                break
            await asyncio.sleep(0.01)
        assert store.answered_lines(batch_id) == {0, 1}
        await runner.stop()  # c and d were in flight: not recorded

        again = BatchStore(tmp_path / "b.db", tmp_path / "files")  # a new process
        second = Answers()
        resumed = runner_of(again, second)
        await resumed.start()
        await wait_status(again, batch_id, BatchStatus.COMPLETED)
        assert set(second.seen) == {"c", "d", "bad"}  # a and b were not sent again
        record = again.batch("team", batch_id)
        assert record is not None
        assert record.to_openai()["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
        good = output_of(again, record.output_file_id)
        assert [line["custom_id"] for line in good] == ["c-a", "c-b", "c-c", "c-d"]
        assert all(line["response"]["status_code"] == 200 for line in good)
        assert good[0]["response"]["body"] == {"tag": "a", "auth": f"Bearer {SECRET}"}
        (bad,) = output_of(again, record.error_file_id)
        assert bad["custom_id"] == "c-bad" and bad["response"]["status_code"] == 400
        # Each line went in as the batch's key, from its creator's address, marked a batch.
        scope = second.scopes[0]
        assert scope[BATCH_SCOPE] == batch_id and scope["client"] == ("10.0.0.5", 4000)
        assert dict(scope["headers"])[b"host"] == b"box"
        assert await asyncio.to_thread(again.unfinished) == []

    asyncio.run(main())


def test_busy_answers_are_retried_not_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        store = BatchStore(tmp_path / "b.db", tmp_path / "files")
        batch_id = make_batch(store, ["a", "b"])
        app = Answers(busy=3)
        runner = runner_of(store, app, at_once=1)
        await runner.start()
        await wait_status(store, batch_id, BatchStatus.COMPLETED)
        assert app.seen == Counter({"a": 1, "b": 1})

    asyncio.run(main())


def test_cancel_and_expiry_report_the_lines_not_run(tmp_path: Path) -> None:
    async def main() -> None:
        store = BatchStore(tmp_path / "b.db", tmp_path / "files")
        cancelled = make_batch(store, ["a", "b", "c"])
        app = Answers(held={"a"})
        runner = runner_of(store, app, at_once=1)
        await runner.start()
        while not app.scopes:  # line a is in flight, held
            await asyncio.sleep(0.01)
        record = runner.cancel("team", cancelled)
        assert record is not None and record.status is BatchStatus.CANCELLING
        assert runner.cancel("other", cancelled) is None  # another key's batch is unknown
        app.release.set()
        await wait_status(store, cancelled, BatchStatus.CANCELLED)
        done = store.batch("team", cancelled)
        assert done is not None
        assert [line["custom_id"] for line in output_of(store, done.output_file_id)] == ["c-a"]
        left = output_of(store, done.error_file_id)
        assert [line["error"]["code"] for line in left] == ["batch_cancelled"] * 2

        expired = make_batch(store, ["x", "y"], window=-1.0)
        runner.launch(expired)
        await wait_status(store, expired, BatchStatus.EXPIRED)
        gone = store.batch("team", expired)
        assert gone is not None
        assert gone.to_openai()["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
        lines = output_of(store, gone.error_file_id)
        assert {line["error"]["code"] for line in lines} == {"batch_expired"}
        assert all(line["response"] is None for line in lines)

    asyncio.run(main())


def test_objects_are_found_only_by_their_owner(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "b.db", tmp_path / "files")
    batch_id = make_batch(store, ["a"])
    record = store.batch("team", batch_id)
    assert record is not None
    assert store.file("intruder", record.input_file_id) is None
    assert store.batch("intruder", batch_id) is None
    assert store.batches_of("intruder", after=None, limit=10) == []
    second = make_batch(store, ["b"])
    page = store.batches_of("team", after=None, limit=1)
    assert [b.id for b in page] == [second]
    assert [b.id for b in store.batches_of("team", after=second, limit=5)] == [batch_id]
    assert store.record(batch_id, 0, ok=True, result={"n": 1})
    assert not store.record(batch_id, 0, ok=True, result={"n": 2})  # never twice
