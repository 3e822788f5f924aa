"""Ollama's API in terms of the OpenAI one: requests in, answers and streams out.

Every Ollama model request becomes the OpenAI chat, completions or embeddings body it means,
which the engine answers exactly as it answers ``/v1``; the answer (or each streamed event) is
then written the way Ollama writes it. Pure functions, no I/O: ``ollama_routes`` serves them.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from appliance.engines.base import Usage
from appliance.errors import InvalidRequestError

OLLAMA_API_VERSION = "0.12.0"
"""The Ollama release whose API ``/api/*`` follows (clients gate features on it)."""

_NS = 1_000_000_000
_LATEST = ":latest"

# Ollama's ``options`` that have a vLLM sampling parameter; the rest (num_ctx, num_gpu,
# mirostat...) describe llama.cpp's runner and are ignored, as Ollama ignores unknown ones.
_SAME_NAME_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
)
_RENAMED_OPTIONS = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}


_T = TypeVar("_T", bound=BaseModel)


class _Request(BaseModel):
    """Fields every Ollama model request has; unknown fields are ignored, as Ollama does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None


class ChatRequest(_Request):
    """``POST /api/chat``."""

    messages: list[dict[str, Any]] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None


class GenerateRequest(_Request):
    """``POST /api/generate``."""

    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None


class EmbedRequest(_Request):
    """``POST /api/embed``."""

    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = None


class EmbeddingsRequest(_Request):
    """``POST /api/embeddings`` (Ollama's older, one-prompt embeddings)."""

    prompt: str = ""


def parse(kind: type[_T], body: dict[str, Any]) -> _T:
    """``body`` as ``kind``; 400 naming the first wrong field otherwise."""
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        raise InvalidRequestError(
            f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request", param=where
        ) from None


def model_name(asked: str) -> str:
    """The catalogue name an Ollama client means: ``NAME:latest`` is ``NAME`` (Ollama adds
    the default tag; the catalogue's names have no tags)."""
    return asked.removesuffix(_LATEST) if asked.endswith(_LATEST) else asked


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds or a Go duration ("5m",
    "1h30m", "-1m"); any negative value keeps the model loaded (``math.inf``), 0 unloads it
    after the request; None: not given."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError("keep_alive: a duration or a number", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = float(text)  # a bare number in a string is seconds, as Ollama reads it
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not text or "".join(n + u for n, u in parts) != text:
                raise InvalidRequestError(
                    f"keep_alive: {value!r} is not a duration (like '5m', '1h30m', '0', '-1')",
                    param="keep_alive",
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        seconds *= sign
    if math.isnan(seconds):
        raise InvalidRequestError("keep_alive: not a number", param="keep_alive")
    return math.inf if seconds < 0 else seconds


def sampling_of(options: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's ``options`` as vLLM's sampling fields (vLLM checks their values)."""
    if not options:
        return {}
    mapped = {key: options[key] for key in _SAME_NAME_OPTIONS if key in options}
    for ours, theirs in _RENAMED_OPTIONS.items():
        if ours in options:
            mapped[theirs] = options[ours]
    # num_predict -1 (forever) and -2 (fill the context) both mean "no cap" here.
    if isinstance(mapped.get("max_tokens"), int) and mapped["max_tokens"] < 0:
        del mapped["max_tokens"]
    return mapped


def response_format_of(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's ``format`` ("json" or a JSON schema) as OpenAI's ``response_format``, which
    vLLM answers with structured output."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise InvalidRequestError(
        f"format: {fmt!r} is neither 'json' nor a JSON schema object", param="format"
    )


def _image_part(image: Any) -> dict[str, Any]:
    if not isinstance(image, str):
        raise InvalidRequestError("images: each image is a base64 string", param="images")
    url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """One Ollama chat message as an OpenAI one: images become image parts, tool calls'
    ``arguments`` objects become the JSON strings OpenAI carries."""
    out = {k: v for k, v in message.items() if k not in ("images", "tool_calls", "tool_name")}
    images = message.get("images")
    if images:
        if not isinstance(images, list):
            raise InvalidRequestError("images: a list of base64 strings", param="images")
        text = message.get("content") or ""
        out["content"] = [{"type": "text", "text": text}, *(_image_part(i) for i in images)]
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {
                    "name": (call.get("function") or {}).get("name"),
                    "arguments": json.dumps((call.get("function") or {}).get("arguments") or {}),
                },
            }
            for n, call in enumerate(calls)
            if isinstance(call, dict)
        ]
    if message.get("role") == "tool" and "tool_call_id" not in out:
        out["tool_call_id"] = "call_0"
    return out


def _common(req: ChatRequest | GenerateRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": req.stream, **sampling_of(req.options)}
    response_format = response_format_of(req.format)
    if response_format is not None:
        body["response_format"] = response_format
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def chat_body(req: ChatRequest) -> dict[str, Any]:
    """The OpenAI chat body of an Ollama chat request."""
    body = _common(req, model_name(req.model))
    for n, message in enumerate(req.messages or []):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages.{n}: each message is an object with a 'role'", param="messages"
            )
    body["messages"] = [_message(m) for m in req.messages or []]
    if req.tools:
        body["tools"] = req.tools
    return body


def generate_body(req: GenerateRequest) -> tuple[Literal["chat", "completions"], dict[str, Any]]:
    """The OpenAI body of an Ollama generate request, and which route it is: ``raw`` sends the
    prompt untouched (completions); otherwise the model's chat template wraps it (with
    ``system``), which is what Ollama's template does."""
    body = _common(req, model_name(req.model))
    if req.raw:
        body["prompt"] = req.prompt or ""
        if req.suffix:
            body["suffix"] = req.suffix
        return "completions", body
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": req.system})
    messages.append(_message({"role": "user", "content": req.prompt or "", "images": req.images}))
    body["messages"] = messages
    return "chat", body


def embed_body(req: EmbedRequest) -> dict[str, Any]:
    """The OpenAI embeddings body of ``/api/embed``."""
    body: dict[str, Any] = {"model": model_name(req.model), "input": req.input}
    if req.truncate:
        body["truncate_prompt_tokens"] = -1  # vLLM: cut to the model's length, as Ollama does
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    return body


def created_at() -> str:
    """Now, as Ollama stamps its answers (RFC 3339, UTC)."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Timing:
    """When a request started and saw its first token, for Ollama's ``*_duration`` fields."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def stats(self, usage: Usage | None) -> dict[str, int]:
        """``total_duration``, ``load_duration``, counts and eval durations (nanoseconds)."""
        now = time.perf_counter()
        first = self.first_token if self.first_token is not None else now
        stats = {
            "total_duration": int((now - self.started) * _NS),
            "load_duration": 0,
            "prompt_eval_duration": int((first - self.started) * _NS),
            "eval_duration": int((now - first) * _NS),
        }
        if usage is not None:
            stats["prompt_eval_count"] = usage.prompt_tokens
            stats["eval_count"] = usage.completion_tokens
        return stats


def done_reason(finish_reason: str | None) -> str:
    """Ollama's ``done_reason`` for OpenAI's ``finish_reason``."""
    if finish_reason in (None, "tool_calls", "stop"):
        return "stop"
    return str(finish_reason)


def tool_calls_of(calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls as Ollama's: ``arguments`` an object, not a JSON string."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments else {}
            except ValueError:
                arguments = {"arguments": arguments}
        out.append({"function": {"name": function.get("name"), "arguments": arguments or {}}})
    return out


def error_message(body: bytes) -> str:
    """The message of an OpenAI (or vLLM) error body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    if isinstance(error, str):
        return error
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])
    return str(data)[:500]


def chat_answer(
    model: str, reply: dict[str, Any], timing: Timing, usage: Usage | None
) -> dict[str, Any]:
    """A whole OpenAI chat completion as Ollama's ``/api/chat`` answer."""
    choice = (reply.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if thinking:
        out_message["thinking"] = thinking
    if message.get("tool_calls"):
        out_message["tool_calls"] = tool_calls_of(message["tool_calls"])
    return {
        "model": model,
        "created_at": created_at(),
        "message": out_message,
        "done": True,
        "done_reason": done_reason(choice.get("finish_reason")),
        **timing.stats(usage),
    }


def generate_answer(
    model: str, reply: dict[str, Any], timing: Timing, usage: Usage | None
) -> dict[str, Any]:
    """A whole OpenAI chat or text completion as Ollama's ``/api/generate`` answer."""
    choice = (reply.get("choices") or [{}])[0]
    if "message" in choice:
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    return {
        "model": model,
        "created_at": created_at(),
        "response": text,
        "done": True,
        "done_reason": done_reason(choice.get("finish_reason")),
        **timing.stats(usage),
    }
