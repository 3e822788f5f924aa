"""An engine's reply on its way out: watched for a client that leaves, timed, its usage noted,
and the model held until the last byte has gone.

Whatever route a model request came by, its reply leaves through here (``ModelServing``): a
whole answer as a ``Response``, a stream as a ``ReleasingStream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from appliance.api.stream_usage import hide_usage
from appliance.engines.asgi_call import content_type
from appliance.engines.base import JSONReply, Reply, StreamReply
from appliance.engines.usage import Usage, may_carry_usage, usage_in_event
from appliance.metrics import Metrics
from appliance.request_info import RequestInfo

CLIENT_CLOSED_REQUEST = 499
"""nginx's "client closed request": the status the access log shows for a client that left."""


async def until_disconnect(work: Awaitable[Reply], request: Request) -> Reply | None:
    """Await ``work``; if the client goes away first, cancel it (which aborts it in vLLM) and
    return None."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def watch_stream(
    chunks: AsyncIterator[bytes], info: RequestInfo, metrics: Metrics, *, hidden_usage: bool
) -> AsyncIterator[bytes]:
    """Pass chunks through; time them and note the usage on the way (``engines.usage``). With
    ``hidden_usage`` the usage event the client did not ask for is read, then taken out
    (``stream_usage``)."""
    model = info.model or ""
    last: float | None = None

    def note(usage: Usage) -> None:
        info.usage = usage

    source = hide_usage(chunks, note) if hidden_usage else chunks
    try:
        async for chunk in source:
            now = time.perf_counter()
            if last is None:
                info.first_token_at = now
            else:
                metrics.observe_inter_token(model, now - last)
            last = now
            if not hidden_usage and may_carry_usage(chunk):
                info.usage = usage_in_event(chunk) or info.usage
            yield chunk
    finally:
        if source is not chunks:
            await source.aclose()  # type: ignore[attr-defined]


class ReleasingStream(StreamingResponse):
    """A streamed answer that, however it ends, closes its source and releases the model.

    Cleanup lives here rather than in the generator's ``finally``: a generator that never
    started runs no ``finally``, and once the client has gone anyio cancels every later await
    in the task, so the cleanup is shielded.
    """

    def __init__(
        self,
        watched: AsyncIterator[bytes],
        source: AsyncIterator[bytes],
        release: contextlib.AsyncExitStack,
        headers: dict[str, str],
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(watched, media_type=media_type, headers=headers)
        self._watched = watched
        self._source = source
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                for iterator in (self._watched, self._source):
                    with contextlib.suppress(Exception):
                        # Closing vLLM's generator is what aborts the request in the engine.
                        await iterator.aclose()  # type: ignore[attr-defined]
                await self._release.aclose()


async def http_answer(
    reply: Reply | None,
    release: contextlib.AsyncExitStack,
    info: RequestInfo,
    metrics: Metrics,
    *,
    hidden_usage: bool = False,
) -> Response:
    """The HTTP answer for an engine's reply, as the engine shaped it (status, content type,
    ``Retry-After``); ``release`` is closed once it has gone out (a stream: at its end)."""
    if reply is None:
        await release.aclose()
        # Nobody is listening; the status is for the log.
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    headers = {k: v for k, v in reply.headers.items() if k.lower() != "content-type"}
    if isinstance(reply, JSONReply):
        await release.aclose()
        info.usage = reply.usage
        return Response(
            content=reply.body,
            status_code=reply.status_code,
            media_type=content_type(reply.headers),
            headers=headers,
        )
    assert isinstance(reply, StreamReply)
    return ReleasingStream(
        watch_stream(reply.chunks, info, metrics, hidden_usage=hidden_usage),
        reply.chunks,
        release,
        headers={"Cache-Control": "no-cache", **headers},
    )
