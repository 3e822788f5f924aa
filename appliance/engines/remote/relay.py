"""A backend's stream passed through: its SSE bytes as they arrive, and the request's end.

Closing an unfinished upstream response drops the connection, which is what makes vLLM abort
the request upstream; so closing is done to the end even for a client that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import httpx

from appliance.errors import envelope

if TYPE_CHECKING:
    from appliance.engines.remote.engine import RemoteEngine


async def shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to the end even when the caller is being cancelled (a client that left).

    Under anyio's level cancellation every await of a cancelled task fails at once, so the
    work runs as its own task. It is used to close upstream responses: closing an unfinished
    one drops the connection, which is what makes vLLM abort the request upstream.
    """
    await asyncio.shield(asyncio.ensure_future(work))


class Call:
    """One request: counted in flight until settled, and its verdict given to the breaker once."""

    def __init__(self, engine: RemoteEngine) -> None:
        self._engine = engine
        self._settled = False
        engine._in_flight += 1

    def settle(self, ok: bool | None, error: str | None = None) -> None:
        """End the request: ``ok`` True/False is the backend's verdict, None says nothing of
        the backend (the client left, our pool was full); only the first call counts."""
        if self._settled:
            return
        self._settled = True
        self._engine.leave(ok, error)


class Relay:
    """The upstream's SSE bytes as they arrive; closing it closes the upstream response.

    A class rather than a generator: ``aclose()`` must close the upstream even when iteration
    never started, which a generator's ``aclose`` would skip.
    """

    def __init__(
        self, engine: RemoteEngine, response: httpx.Response, call: Call, detail: bool
    ) -> None:
        self._engine = engine
        self._detail = detail
        self._response = response
        self._raw = response.aiter_raw()
        self._call = call
        self._done = False
        self._tail = b"\n\n"  # the last two bytes passed on, to end a cut event cleanly

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._raw.__anext__()
            except StopAsyncIteration:
                await self._finish(True)
                raise
            except httpx.HTTPError as exc:
                # The upstream died mid-stream: the client already has a 200 and some events,
                # so the end is an SSE error event, as vLLM itself ends a failed stream.
                error = self._engine.map_error(exc, self._detail)
                await self._finish(False, self._engine.map_error(exc).message)
                event = json.dumps(envelope(error.message, error.error_type, error.code))
                lead = b"" if self._tail == b"\n\n" else b"\n\n"
                return lead + b"data: " + event.encode() + b"\n\n"
            except BaseException:
                await self._finish(None)
                raise
            if chunk:
                self._tail = (self._tail + chunk)[-2:]
                return self._engine.rename(chunk)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early: close the upstream response (the client went away)."""
        await self._finish(None)

    async def _finish(self, ok: bool | None, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._call.settle(ok, error)
        await shielded(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            await self._raw.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()
