"""The batch runner: each line of a batch answered by the appliance's own app, as an online
request of the batch's key, at the lowest priority.

A line is sent into the app in this process (ASGI, no socket) with the batch's key in its
``Authorization`` header and ``BATCH_SCOPE`` in its scope: the same key check, limits, quota,
fair share, usage and access log as any request; its priority is the least urgent
(``api.priority``). A 429 or 503 (the model busy, loading, or the key at its limits) is
retried after its Retry-After until the batch's deadline; any other answer is the line's
result, recorded at once (``BatchStore.record``). After a restart ``start`` resumes every
unfinished batch with the lines that have no result, so none is answered twice or lost.
Once every line has a result the output and error files are written as OpenAI writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.batches.settings import BATCH_SCOPE, BatchSettings
from appliance.batches.store import FINISHED, BatchRecord, BatchStatus, BatchStore, new_id

log = logging.getLogger("appliance.batches")

RETRIED_STATUSES = frozenset({429, 503})
"""Answers that say "not now": the line is tried again, not recorded."""
GIVE_UP_CODES = frozenset({"insufficient_quota"})
"""429s that waiting a little does not cure: recorded as the line's error."""
MAX_RETRY_WAIT = 30.0
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed: the batch was cancelled."


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch's input file (``index``: its 0-based line among requests)."""

    index: int
    custom_id: str
    body: dict[str, Any]


def read_lines(data: bytes) -> list[BatchLine]:
    """The requests of a validated input file, in order (empty lines skipped)."""
    lines = []
    for text in data.decode("utf-8").splitlines():
        if text.strip():
            item = json.loads(text)
            lines.append(BatchLine(len(lines), str(item["custom_id"]), dict(item["body"])))
    return lines


class _AsBatch:
    """The app, for one batch's requests: their scope says whose batch and from where."""

    def __init__(self, app: ASGIApp, batch_id: str, client: tuple[str, int] | None) -> None:
        self._app = app
        self._batch_id = batch_id
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, BATCH_SCOPE: self._batch_id}
        if self._client is not None:
            scope["client"] = self._client
        await self._app(scope, receive, send)


class BatchRunner:
    """Runs the store's batches through ``app`` (bound once the app exists)."""

    def __init__(
        self, store: BatchStore, settings: BatchSettings, key_secrets: Mapping[str, str]
    ) -> None:
        """``key_secrets``: each key's secret by name, to send a batch's lines as its key."""
        self.store = store
        self._settings = settings
        self._secrets = key_secrets
        self._app: ASGIApp | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def bind(self, app: ASGIApp) -> None:
        """The app whose routes answer the lines."""
        self._app = app

    async def start(self) -> None:
        """Resume every unfinished batch (after a restart: from its unanswered lines)."""
        for batch_id in self.store.unfinished():
            self.launch(batch_id)

    async def stop(self) -> None:
        """Stop every batch where it is; lines in flight are not recorded (redone later)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def launch(self, batch_id: str) -> None:
        """Run ``batch_id`` in the background (once)."""
        if batch_id not in self._tasks:
            # A context of its own: its log lines are not the creating request's.
            task = asyncio.create_task(
                self._run(batch_id), name=f"batch {batch_id}", context=contextvars.Context()
            )
            self._tasks[batch_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, owner: str, batch_id: str) -> BatchRecord | None:
        """Ask ``owner``'s batch to stop: lines not started are not run; None if unknown."""
        if self.store.batch(owner, batch_id) is None:
            return None
        self.store.set_status(
            batch_id, BatchStatus.CANCELLING, unless=FINISHED | {BatchStatus.FINALIZING}
        )
        return self.store.batch(owner, batch_id)

    # -- one batch ---------------------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        try:
            await self._run_lines(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s failed", batch_id, extra={"event": "batch_failed"})
            self.store.set_status(batch_id, BatchStatus.FAILED, unless=FINISHED)

    def _stopping(self, batch_id: str, deadline: float) -> bool:
        record = self.store.batch(None, batch_id)
        return record is None or record.status is BatchStatus.CANCELLING or time.time() > deadline

    async def _run_lines(self, batch_id: str) -> None:
        record = self.store.batch(None, batch_id)
        if record is None or record.status in FINISHED:
            return
        self.store.set_status(
            batch_id,
            BatchStatus.IN_PROGRESS,
            unless=FINISHED | {BatchStatus.CANCELLING, BatchStatus.FINALIZING},
        )
        deadline = float(record.times.get("expires_at", time.time()))
        input_file = self.store.file(record.owner, record.input_file_id)
        lines = read_lines(self.store.content(input_file)) if input_file else []
        answered = self.store.answered_lines(batch_id)
        pending = [line for line in lines if line.index not in answered]
        places = asyncio.Semaphore(self._settings.lines_at_once)

        async def one(line: BatchLine) -> None:
            async with places:
                if not self._stopping(batch_id, deadline):
                    await self._answer(record, line, deadline)

        await asyncio.gather(*(one(line) for line in pending))
        self._finish(batch_id, lines, deadline)

    async def _answer(self, record: BatchRecord, line: BatchLine, deadline: float) -> None:
        """Send ``line`` until it gets an answer that is not "retry", then record it."""
        request_id = new_id("batch_req_")
        while True:
            status, body, retry_after = await self._send(record, line, request_id)
            code = body.get("error", {}).get("code") if isinstance(body, dict) else None
            if status not in RETRIED_STATUSES or code in GIVE_UP_CODES:
                break
            wait = min(max(retry_after, 0.2), MAX_RETRY_WAIT)
            if time.time() + wait > deadline or self._stopping(record.id, deadline):
                return  # left for _finish: expired or cancelled
            await asyncio.sleep(wait)
        result = {
            "id": request_id,
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
        self.store.record(record.id, line.index, ok=status < 400, result=result)

    async def _send(
        self, record: BatchRecord, line: BatchLine, request_id: str
    ) -> tuple[int, Any, float]:
        """One try of ``line`` through the app: (status, JSON body, Retry-After seconds)."""
        assert self._app is not None, "the runner is not bound to an app"
        peer = record.peer or {}
        client = peer.get("client")
        headers = {"X-Request-Id": request_id, "Host": str(peer.get("host") or "localhost")}
        secret = self._secrets.get(record.owner)
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        # A line's answer is one JSON body: a stream (and its options) is not one.
        body = {k: v for k, v in line.body.items() if k != "stream_options"}
        body["stream"] = False
        transport = httpx.ASGITransport(
            app=_AsBatch(self._app, record.id, tuple(client) if client else None)
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://batch") as client_:
            reply = await client_.post(record.endpoint, json=body, headers=headers, timeout=None)
        try:
            answer: Any = reply.json()
        except ValueError:
            answer = {"error": {"message": reply.text[:1000], "code": reply.status_code}}
        retry = reply.headers.get("retry-after", "1")
        try:
            retry_after = float(retry)
        except ValueError:
            retry_after = 1.0
        return reply.status_code, answer, retry_after

    def _finish(self, batch_id: str, lines: list[BatchLine], deadline: float) -> None:
        """Every line has a result, or the batch stops (cancelled, expired): mark the lines
        left, write the output and error files, and set the final status."""
        record = self.store.batch(None, batch_id)
        if record is None or record.status in FINISHED:
            return
        answered = self.store.answered_lines(batch_id)
        left = [line for line in lines if line.index not in answered]
        final = BatchStatus.COMPLETED
        if left:
            cancelled = record.status is BatchStatus.CANCELLING
            if not cancelled and time.time() <= deadline:
                return  # stopped early (a shutdown): resumed at the next start
            final = BatchStatus.CANCELLED if cancelled else BatchStatus.EXPIRED
            code = "batch_cancelled" if cancelled else "batch_expired"
            message = CANCELLED_MESSAGE if cancelled else EXPIRED_MESSAGE
            for line in left:
                self.store.record(
                    batch_id,
                    line.index,
                    ok=False,
                    result={
                        "id": new_id("batch_req_"),
                        "custom_id": line.custom_id,
                        "response": None,
                        "error": {"code": code, "message": message},
                    },
                )
        if final is BatchStatus.COMPLETED:
            self.store.set_status(batch_id, BatchStatus.FINALIZING, unless=FINISHED)
        outputs = self.store.results(batch_id)
        good = "".join(text + "\n" for ok, text in outputs if ok).encode()
        bad = "".join(text + "\n" for ok, text in outputs if not ok).encode()
        output = self.store.add_file(record.owner, f"{batch_id}_output.jsonl", "batch_output", good)
        errors = (
            self.store.add_file(record.owner, f"{batch_id}_error.jsonl", "batch_output", bad)
            if bad
            else None
        )
        self.store.set_status(
            batch_id,
            final,
            unless=FINISHED,
            output_file_id=output.id,
            error_file_id=errors.id if errors else None,
        )
        log.info(
            "batch %s %s", batch_id, final.value, extra={"event": "batch_done", "lines": len(lines)}
        )
