"""Token counts of every stream, whether or not the client asked for them.

A streamed answer carries its usage only when the client sends
``stream_options.include_usage``; per-key accounting and quotas must not depend on that. So a
stream that did not ask is sent to the engine asking, and the usage event it then gets is read
and taken out of what the client receives, which is the stream it asked for:

- vLLM ends such a stream with one extra event, ``{"choices": [], "usage": {...}}``; it is
  dropped here.
- vLLM stamps ``system_fingerprint`` on the chunks that finish a choice only when usage is off
  (the usage event carries it instead); those chunks are held back until the usage event
  arrives, then passed on with the fingerprint stamped as vLLM would have.

Events are recognised within a chunk (vLLM sends one event per chunk). An event cut across
chunks (a remote backend's raw bytes) is passed on untouched.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from appliance.engines.usage import USAGE_MARK, Usage, usage_in_event

_FINISHED_MARK = b'"finish_reason":"'
_NO_CHOICES = b'"choices":[]'


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Make a streamed ``body`` ask for usage; True if it did not already (so hide it)."""
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return False  # the engine refuses it with its own message
    if options.get("include_usage") or options.get("continuous_usage_stats"):
        # Continuous stats put usage on every chunk once usage is on: not ours to turn on.
        return False
    body["stream_options"] = {**options, "include_usage": True}
    return True


def _fingerprint(event: bytes) -> str | None:
    for line in event.splitlines():
        if line.startswith(b"data: {"):
            try:
                found = json.loads(line[6:]).get("system_fingerprint")
            except (ValueError, RecursionError):
                return None
            return found if isinstance(found, str) else None
    return None


def _stamped(chunk: bytes, fingerprint: str | None) -> bytes:
    """``chunk`` (one finishing event) with the fingerprint vLLM puts last in its JSON."""
    if fingerprint is None or not chunk.startswith(b"data: {") or not chunk.endswith(b"}\n\n"):
        return chunk
    field = b',"system_fingerprint":' + json.dumps(fingerprint).encode()
    return chunk[:-3] + field + b"}\n\n"


async def hide_usage(
    chunks: AsyncIterator[bytes], on_usage: Callable[[Usage], None]
) -> AsyncIterator[bytes]:
    """``chunks`` without the usage event the client did not ask for; its usage goes to
    ``on_usage`` as soon as it is seen."""
    held: list[bytes] = []
    async for chunk in chunks:
        if USAGE_MARK in chunk and _NO_CHOICES in chunk and chunk.endswith(b"\n\n"):
            usage = usage_in_event(chunk)
            if usage is not None:
                on_usage(usage)
                fingerprint = _fingerprint(chunk)
                for each in held:
                    yield _stamped(each, fingerprint) if _FINISHED_MARK in each else each
                held.clear()
                continue
        if held or _FINISHED_MARK in chunk:
            held.append(chunk)
            continue
        yield chunk
    for each in held:  # no usage event came: pass on what was held, as it was
        yield each
