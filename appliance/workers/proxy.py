"""Passing a request from an HTTP worker to the owner process, over its private Unix socket.

What a worker does not serve itself (the admin API, metrics, the status page, the model list,
remote backends, hub downloads...) goes to the owner whole, and its answer comes back as it is
written (streams included). The owner believes the client address the worker names only from
a worker: the header carrying it must come with the token workers got at spawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.types import Receive, Scope, Send

from appliance.api.forwarded import PEER_HEADER, TOKEN_HEADER

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"host",
    }
)


class OwnerProxy:
    """An ASGI app that answers each request by asking the owner over ``socket_path``."""

    def __init__(self, socket_path: Path, token: str) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://owner",
            # The owner may take as long as the request needs (a load, a download's stream).
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._token = token.encode()

    async def aclose(self) -> None:
        """Close the connections to the owner."""
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in _HOP_BY_HOP]
        headers = [(k, v) for k, v in headers if k not in (PEER_HEADER, TOKEN_HEADER)]
        for name, value in scope.get("headers", ()):
            if name == b"host":
                headers.append((b"host", value))
        client = scope.get("client")
        if client:
            headers.append((PEER_HEADER, f"{client[0]}:{client[1]}".encode()))
        headers.append((TOKEN_HEADER, self._token))
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = path.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")
        body = scope.pop(BODY_SCOPE, None)
        if body is not None:
            # Read already (to find the model): sent with its own length.
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        else:
            # The body framed as the client framed it: its Content-Length kept (httpx then
            # streams it without chunking), chunked if it was, none if it had none (a body of
            # unknown length would make the owner refuse a bodyless POST as not JSON).
            framed = any(
                k.lower() in (b"content-length", b"transfer-encoding")
                for k, _ in scope.get("headers", ())
            )
            body = _body_of(receive) if framed else b""
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:
            await _send_unavailable(send)
            return
        try:
            out = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                # Raw bytes pass through (aiter_raw), so the owner's Content-Length holds.
                if k.lower().encode("latin-1") not in _HOP_BY_HOP
            ]
            start = {"type": "http.response.start", "status": response.status_code, "headers": out}
            await send(start)
            with contextlib.suppress(httpx.HTTPError):
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # Closing the owner's stream early is how a client's disconnect reaches it.
            await response.aclose()


BODY_SCOPE = "appliance.worker.body"
"""Where a worker leaves a body it has read already, for the proxy to send instead."""


async def _body_of(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_unavailable(send: Send) -> None:
    body = (
        b'{"error":{"message":"the appliance is shutting down or restarting; retry shortly",'
        b'"type":"service_unavailable","param":null,"code":"owner_unavailable"}}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": body})
