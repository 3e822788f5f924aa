"""Issue 11: an engine's own ASGI app answers a route: whole answers, streams, cancellation."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.engines.asgi_call import call_app
from appliance.engines.base import JSONReply, RouteCall, StreamReply, Usage
from appliance.engines.usage import usage_in_event


def _app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {"got": body, "id": request.headers.get("x-request-id")},
            status_code=int(body.get("status", 200)),
        )

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            try:
                for n in range(3):
                    yield f"data: {n}\n\n"
                await asyncio.sleep(3600)  # until cancelled
            finally:
                events.append("stream closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def _call(path: str, body: object) -> RouteCall:
    return RouteCall(
        route=f"POST {path}",
        method="POST",
        path=path,
        body=json.dumps(body).encode(),
        request_id="req-1",
    )


def test_a_whole_answer_keeps_status_body_and_content_type() -> None:
    async def run() -> JSONReply:
        reply = await call_app(_app([]), _call("/echo", {"status": 418, "x": 1}))
        assert isinstance(reply, JSONReply)
        return reply

    reply = asyncio.run(run())
    assert reply.status_code == 418
    assert json.loads(reply.body) == {"got": {"status": 418, "x": 1}, "id": "req-1"}
    assert reply.headers["content-type"] == "application/json"


def test_a_stream_passes_events_and_closing_it_stops_the_app() -> None:
    events: list[str] = []

    async def run() -> list[bytes]:
        reply = await call_app(_app(events), _call("/stream", {}))
        assert isinstance(reply, StreamReply)
        assert reply.headers["content-type"].startswith("text/event-stream")
        got = []
        async for chunk in reply.chunks:
            got.append(chunk)
            if len(got) == 3:
                break
        await reply.chunks.aclose()  # type: ignore[attr-defined]
        return got

    assert asyncio.run(run()) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert events == ["stream closed"]


def test_an_unknown_route_is_the_apps_own_404() -> None:
    reply = asyncio.run(call_app(_app([]), _call("/nothing", {})))
    assert isinstance(reply, JSONReply) and reply.status_code == 404


@pytest.mark.parametrize(
    ("event", "usage"),
    [
        (
            b'data: {"type":"message_delta","usage":{"input_tokens":8,"output_tokens":3}}\n\n',
            Usage(8, 3),
        ),
        (
            b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":5,'
            b'"output_tokens":2}}}\n\n',
            Usage(5, 2),
        ),
        (b'data: {"message":{"usage":{"input_tokens":7,"output_tokens":0}}}\n\n', Usage(7, 0)),
        (b"data: [DONE]\n\n", None),
    ],
)
def test_token_counts_of_responses_and_messages_events(event: bytes, usage: Usage | None) -> None:
    assert usage_in_event(event) == usage
