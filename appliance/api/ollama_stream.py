"""An OpenAI stream (server-sent events) rewritten as Ollama streams: NDJSON, one object a line.

Each content delta becomes ``{"model", "created_at", "message"|"response", "done": false}``;
tool calls, whose arguments OpenAI streams in pieces, are gathered and sent whole in one line,
as Ollama sends them; the last line is ``"done": true`` with ``done_reason`` and the counts
and durations. An error event becomes Ollama's ``{"error": "..."}`` line.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from appliance.api.ollama_schema import Timing, created_at, done_reason, tool_calls_of
from appliance.engines.usage import Usage, usage_of

Kind = Literal["chat", "generate"]


class StreamTranslator:
    """Feed it the engine's SSE chunks in order; it returns the NDJSON lines to send."""

    def __init__(self, kind: Kind, model: str, timing: Timing) -> None:
        self._kind = kind
        self._model = model
        self._timing = timing
        self._pending = b""
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._calls: dict[int, dict[str, Any]] = {}
        self._done = False

    @property
    def usage(self) -> Usage | None:
        """The token counts the stream's usage event gave (None until it came)."""
        return self._usage

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines for ``chunk``; an event cut across chunks waits for its end."""
        self._pending += chunk
        lines: list[bytes] = []
        while b"\n\n" in self._pending:
            event, self._pending = self._pending.split(b"\n\n", 1)
            for line in event.splitlines():
                if line.startswith(b"data: "):
                    lines.extend(self._event(line[6:].strip()))
        return lines

    def finish(self) -> list[bytes]:
        """The last line (``done``), if the stream ended without it (no ``[DONE]``)."""
        return [] if self._done else self._final()

    def _event(self, data: bytes) -> list[bytes]:
        if self._done:
            return []
        if data == b"[DONE]":
            return self._final()
        try:
            event = json.loads(data)
        except ValueError:
            return []
        if not isinstance(event, dict):
            return []
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            self._done = True
            return [_line({"error": str(message)})]
        usage = usage_of(event.get("usage"))
        if usage is not None:
            self._usage = usage
        out: list[bytes] = []
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            text, thinking = self._text_of(choice)
            if text or thinking:
                if self._timing.first_token is None:
                    self._timing.first_token = time.perf_counter()
                out.append(self._piece(text, thinking))
        return out

    def _text_of(self, choice: dict[str, Any]) -> tuple[str, str]:
        if self._kind == "generate" and "text" in choice:
            return choice.get("text") or "", ""
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            self._gather(call)
        thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
        return delta.get("content") or "", thinking

    def _gather(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self._calls))
        held = self._calls.setdefault(index, {"function": {"name": None, "arguments": ""}})
        function = call.get("function") or {}
        if function.get("name"):
            held["function"]["name"] = function["name"]
        held["function"]["arguments"] += function.get("arguments") or ""

    def _piece(self, text: str, thinking: str = "") -> bytes:
        head: dict[str, Any] = {"model": self._model, "created_at": created_at()}
        if self._kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            head["message"] = message
        else:
            head["response"] = text
            if thinking:
                head["thinking"] = thinking
        head["done"] = False
        return _line(head)

    def _final(self) -> list[bytes]:
        self._done = True
        lines = []
        if self._calls:
            calls = [self._calls[i] for i in sorted(self._calls)]
            piece = json.loads(self._piece(""))
            piece["message"]["tool_calls"] = tool_calls_of(calls)
            lines.append(_line(piece))
        last: dict[str, Any] = {"model": self._model, "created_at": created_at()}
        if self._kind == "chat":
            last["message"] = {"role": "assistant", "content": ""}
        else:
            last["response"] = ""
        last.update(
            done=True, done_reason=done_reason(self._finish), **self._timing.stats(self._usage)
        )
        lines.append(_line(last))
        return lines


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
