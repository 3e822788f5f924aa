"""What of a backend's answer reaches the client: its model renamed, its errors rebuilt.

A backend is untrusted: its error text is cleaned and shortened, its envelope rebuilt from
checked fields, and its bytes are never passed on as an error body.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from appliance.errors import envelope


def with_model(content: bytes, model: str) -> bytes:
    """A JSON body naming ``model`` instead of this entry's name (``backend_model``); a body
    that is not a JSON object with a ``model`` goes on untouched, for the backend to judge."""
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if not isinstance(body, dict) or "model" not in body:
        return content
    return json.dumps({**body, "model": model}, ensure_ascii=False, separators=(",", ":")).encode()


class Rename:
    """Puts this entry's name where the backend's answer names the model by its own name
    (``backend_model``), as ``vllm serve --served-model-name`` would answer: a bytes
    replacement of the ``"model"`` member, so nothing is re-parsed or re-encoded."""

    def __init__(self, upstream: str, ours: str) -> None:
        self._pairs: list[tuple[bytes, bytes]] = []
        if upstream != ours:
            theirs, mine = json.dumps(upstream).encode(), json.dumps(ours).encode()
            for colon in (b":", b": "):
                self._pairs.append((b'"model"' + colon + theirs, b'"model"' + colon + mine))

    def __call__(self, data: bytes) -> bytes:
        for theirs, mine in self._pairs:
            data = data.replace(theirs, mine)
        return data


def printable(text: str, limit: int) -> str:
    """``text`` without control characters, at most ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in text[: limit * 2]).strip()
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


def clean_envelope(error: dict[str, Any], status: int) -> dict[str, Any]:
    """An upstream's error envelope rebuilt from its fields, each checked and shortened."""

    def text(value: Any, limit: int) -> str | None:
        return printable(value, limit) if isinstance(value, str) else None

    code = error.get("code")
    return envelope(
        text(error.get("message"), 1000) or f"the backend answered {status}",
        text(error.get("type"), 64) or "backend_error",
        code if isinstance(code, int) and not isinstance(code, bool) else text(code, 64),
        text(error.get("param"), 128),
    )


def error_body(where: str, status: int, raw: bytes, detail: bool = True) -> tuple[int, bytes]:
    """An upstream error as an OpenAI envelope, rebuilt (never the upstream's bytes).

    An upstream envelope keeps its fields (strings only, the message shortened) and its
    status, so a remote appliance's 503 with Retry-After reaches the client as such.
    Anything else is wrapped: a 4xx keeps its status (the request was at fault) and a 5xx
    becomes 502 (the backend was); its text, cleaned and shortened, is shown only to
    callers who may see the backend (``detail``). ``where`` names the backend.
    """
    with contextlib.suppress(ValueError, RecursionError):
        parsed = json.loads(raw)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            return status, json.dumps(clean_envelope(error, status)).encode()
    text = printable(raw.decode("utf-8", "replace"), 300) or "no body"
    message = f"{where} answered {status}: {text}" if detail else f"{where} answered {status}"
    if status < 500:
        return status, json.dumps(envelope(message, "invalid_request_error", status)).encode()
    return 502, json.dumps(envelope(message, "backend_error", "backend_error")).encode()
