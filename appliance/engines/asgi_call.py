"""Calling an ASGI app in this process and turning its answer into a ``Reply``.

A local engine answers the routes of ``vllm serve`` with vLLM's own app for that engine (see
``appliance.engines.vllm``), so that status codes, error bodies and stream events are vLLM's.
This module is the plumbing between that app and the appliance's routes: it hands the app the
body the appliance has already read, collects what the app sends, and gives back a whole JSON
answer or a stream, without re-encoding anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message

from appliance.engines.base import JSONReply, Reply, RouteCall, StreamReply

_KEPT_HEADERS = frozenset({"content-type", "retry-after"})


def _scope(call: RouteCall, body: bytes, client: Any, server: Any) -> dict[str, Any]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if call.request_id:
        # vLLM takes its request id from this header, so its log lines match the appliance's.
        headers.append((b"x-request-id", call.request_id.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "root_path": "",
        "query_string": call.query,
        "headers": headers,
        "client": client,
        "server": server,
        "state": {},
    }


class _AppStream:
    """The body messages of an app's streamed answer; closing it cancels the app's task.

    Cancelling the task closes vLLM's generator, which aborts the request in the engine (the
    client went away). A class rather than a generator so ``aclose`` works before iteration.
    """

    def __init__(self, first: bytes, queue: asyncio.Queue[Message], task: asyncio.Task[None]):
        self._pending: bytes | None = first
        self._queue = queue
        self._task = task
        self._done = False

    def __aiter__(self) -> _AppStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            if self._pending is not None:
                chunk, self._pending = self._pending, None
                if chunk:
                    return chunk
                continue
            message = await _next_message(self._queue, self._task)
            if message is None or message["type"] != "http.response.body":
                break
            if not message.get("more_body", False):
                self._done = True
            chunk = message.get("body", b"")
            if chunk:
                return bytes(chunk)
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop: cancel the app's task (aborting the request) and wait for it to end."""
        self._done = True
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def _next_message(queue: asyncio.Queue[Message], task: asyncio.Task[None]) -> Message | None:
    """The app's next message; None once it has ended without one; its exception if it raised."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        getter.cancel()
        raise
    if getter.done():
        return getter.result()
    getter.cancel()
    if not queue.empty():
        return queue.get_nowait()
    task.result()  # raises what the app raised
    return None


def _headers(raw: Any) -> dict[str, str]:
    kept: dict[str, str] = {}
    for name, value in raw or ():
        key = bytes(name).decode("latin-1").lower()
        if key in _KEPT_HEADERS:
            kept[key] = bytes(value).decode("latin-1")
    return kept


async def call_app(
    app: ASGIApp,
    call: RouteCall,
    *,
    client: Any = None,
    server: Any = None,
) -> Reply:
    """Send ``call`` to ``app``; its whole answer as a ``JSONReply``, or a ``StreamReply``
    when the app streams (an answer sent in more than one piece with a 2xx status).

    The ``content-type`` of the answer travels in the reply's headers.
    """
    queue: asyncio.Queue[Message] = asyncio.Queue()
    body = call.content()
    body_sent = False
    closed = asyncio.Event()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The app waits here for a disconnect; the appliance's own route watches the real
        # client and cancels the app's task (through the reply) when it goes away.
        await closed.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(_scope(call, body, client, server), receive, send))
    streaming = False
    try:
        start = await _next_message(queue, task)
        if start is None or start["type"] != "http.response.start":
            raise RuntimeError(f"{call.route}: the engine's app answered nothing")
        status = int(start["status"])
        headers = _headers(start.get("headers"))
        pieces: list[bytes] = []
        while True:
            message = await _next_message(queue, task)
            if message is None or message["type"] != "http.response.body":
                break
            more = bool(message.get("more_body", False))
            chunk = bytes(message.get("body", b""))
            if more and status < 300 and not pieces:
                streaming = True
                return StreamReply(chunks=_AppStream(chunk, queue, task), headers=headers)
            pieces.append(chunk)
            if not more:
                break
        return JSONReply(status_code=status, body=b"".join(pieces), headers=headers)
    except BaseException:
        task.cancel()  # the client went away or the app failed: stop the work in vLLM
        raise
    finally:
        if not streaming:
            closed.set()
            # A whole answer has been sent; what remains is background work (vLLM's load
            # counter), left to finish on its own.
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Read a finished task's outcome, so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


def content_type(headers: Mapping[str, str]) -> str:
    """The reply's content type (JSON when the engine did not say)."""
    return headers.get("content-type", "application/json")
