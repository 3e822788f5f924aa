"""Token usage: the one place that reads it out of an answer, whoever answered.

A request's token counts come in three shapes, all read here: a ``usage`` object (OpenAI's
``prompt_tokens``/``completion_tokens``, or the Responses and Anthropic APIs'
``input_tokens``/``output_tokens``), a whole JSON answer holding one, and a server-sent event
holding one (at the top, or inside ``response`` or ``message`` for the Responses and Messages
APIs' events). Counts may come from a remote backend, which is untrusted: anything but a sane
count reads as 0, and JSON nested past the parser reads as no usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_TOKENS_COUNTED = 2**40  # far past any request; a larger count is a backend's garbage
USAGE_MARK = b'"usage":{'
"""In a chunk of vLLM's compact JSON, the sign that it may carry a usage object."""
_USAGE_KEY = b'"usage"'


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, when known."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        # Anything but a sane count is 0, so that it cannot break a request, the metrics
        # (counters refuse negatives) or usage.
        for name in ("prompt_tokens", "completion_tokens"):
            if not _is_count(getattr(self, name)):
                object.__setattr__(self, name, 0)

    @classmethod
    def of(cls, usage: object) -> Usage | None:
        """The counts of a ``usage`` object (``usage_of``); None when it is not an object."""
        return usage_of(usage)


def _is_count(value: object) -> bool:
    return (
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKENS_COUNTED
    )


def usage_of(usage: object) -> Usage | None:
    """The counts of a ``usage`` object in either naming; None when it is not an object."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:  # the Responses and Anthropic APIs
        return Usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
    return Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def usage_in_json(body: bytes | memoryview) -> Usage | None:
    """The top-level ``usage`` of a whole JSON answer, found from the end (it comes last in
    every answer that has one), so a long answer is not parsed whole."""
    data = bytes(body)
    at = data.rfind(_USAGE_KEY)
    if at < 0:
        return None
    rest = data[at + len(_USAGE_KEY) :].lstrip().removeprefix(b":").lstrip()
    try:
        usage, _ = json.JSONDecoder().raw_decode(rest.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # a hostile backend's usage nested past the parser
        return None
    return usage_of(usage)


def usage_in_event(chunk: bytes) -> Usage | None:
    """The usage the ``data: {...}`` events of ``chunk`` carry (the last one, if several);
    None when none does. An event that is not JSON is skipped (a backend's are untrusted)."""
    found = None
    for line in chunk.splitlines():
        if not line.startswith(b"data: {"):
            continue
        try:
            event = json.loads(line[6:])
        except (ValueError, RecursionError):
            continue
        for holder in (event, event.get("response"), event.get("message")):
            usage = usage_of(holder.get("usage")) if isinstance(holder, dict) else None
            if usage is not None:
                found = usage
    return found


def may_carry_usage(chunk: bytes) -> bool:
    """Whether ``chunk`` may hold a usage event worth parsing (a cheap test of its bytes)."""
    return USAGE_MARK in chunk or b'"input_tokens"' in chunk
