"""Requests that HTTP workers pass to the owner, and the worker's name on every answer.

With ``appliance up --workers K``, a worker passes what it does not serve itself to the owner
process over a private Unix socket (``appliance.workers.proxy``). The client's address then
travels in a header, believed only with the token the workers got at spawn.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PEER_HEADER = b"x-appliance-peer"
TOKEN_HEADER = b"x-appliance-worker-token"
WORKER_HEADER = b"x-appliance-worker"
"""On every answer when there are several HTTP workers: which one (0 is the owner) took it."""


class TrustWorkers:
    """The owner's outermost middleware: a request a worker passed on (it carries the
    workers' token) gets the client address the worker names; from anyone else, those
    headers are dropped, so no client can claim an address."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        given = {k: v for k, v in headers if k in (PEER_HEADER, TOKEN_HEADER)}
        if given:
            scope["headers"] = [(k, v) for k, v in headers if k not in (PEER_HEADER, TOKEN_HEADER)]
            token = given.get(TOKEN_HEADER)
            if (
                self._token is not None
                and token is not None
                and hmac.compare_digest(token, self._token)
            ):
                host, _, port = given.get(PEER_HEADER, b"").decode("latin-1").rpartition(":")
                scope["client"] = (host, int(port)) if host and port.isdigit() else None
        await self.app(scope, receive, send)


class NameTheWorker:
    """Adds ``X-Appliance-Worker: N`` to every answer this process writes."""

    def __init__(self, app: ASGIApp, *, index: int) -> None:
        self.app = app
        self._header = (WORKER_HEADER, str(index).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != WORKER_HEADER]
                message["headers"] = [*headers, self._header]
            await send(message)

        await self.app(scope, receive, named)
