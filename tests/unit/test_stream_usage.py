"""Usage of streams the client did not ask usage for: asked of the engine, then hidden."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.api.stream_usage import ask_for_usage, hide_usage
from appliance.engines.base import Usage


@pytest.mark.parametrize(
    ("options", "asked", "after"),
    [
        (None, True, {"include_usage": True}),
        ({}, True, {"include_usage": True}),
        ({"include_usage": False}, True, {"include_usage": True}),
        ({"include_usage": True}, False, {"include_usage": True}),
        ({"continuous_usage_stats": True}, False, {"continuous_usage_stats": True}),
        ("bad", False, "bad"),
    ],
)
def test_ask_for_usage(options: Any, asked: bool, after: Any) -> None:
    body: dict[str, Any] = {"model": "m", "stream": True}
    if options is not None:
        body["stream_options"] = options
    assert ask_for_usage(body) is asked
    assert body["stream_options"] == after


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def relay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def collect(chunks: list[bytes]) -> tuple[list[bytes], list[Usage]]:
    seen: list[Usage] = []

    async def run() -> list[bytes]:
        return [c async for c in hide_usage(relay(chunks), seen.append)]

    return asyncio.run(run()), seen


def test_hides_the_usage_event_and_stamps_the_fingerprint() -> None:
    first = event({"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]})
    last = event({"id": "x", "choices": [{"index": 0, "finish_reason": "length"}]})
    usage = event(
        {
            "id": "x",
            "choices": [],
            "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
            "system_fingerprint": "fp-1",
        }
    )
    out, seen = collect([first, last, usage, b"data: [DONE]\n\n"])
    stamped = event(
        {
            "id": "x",
            "choices": [{"index": 0, "finish_reason": "length"}],
            "system_fingerprint": "fp-1",
        }
    )
    assert out == [first, stamped, b"data: [DONE]\n\n"]
    assert seen == [Usage(4, 2)]


def test_without_a_usage_event_everything_passes_as_it_was() -> None:
    last = event({"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]})
    out, seen = collect([last, b"data: [DONE]\n\n"])
    assert out == [last, b"data: [DONE]\n\n"]
    assert seen == []
