"""What one request may ask of an engine, read from its body once, before it is admitted.

A request can fan out: ``n`` (and ``best_of``) copies of each prompt, several prompts in one
``/v1/completions`` call, several conversations in one ``/v1/chat/completions/batch`` call.
Each sequence is as much work as a request of its own, so fan-out is capped
(``FanOutLimits``), and what is left is charged as what it is: a request's ``sequences``
count against its key's requests per minute, and ``sequences x max_tokens`` against its
token quota, before it runs (``model_access.admit_model_request``). Structured-output
constraints are measured here too (``structured_limits``), so no engine compiles one past
its limits. A field of the wrong type is left alone: the engine answers it as ``vllm serve``
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.api.structured_limits import check_constraints
from appliance.errors import InvalidRequestError
from appliance.settings import FanOutLimits, Settings, StructuredOutputLimits

BATCH_CHAT_PATH = "/v1/chat/completions/batch"
COMPLETIONS_PATH = "/v1/completions"
GENERATE_PATH = "/inference/v1/generate"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's ``max_tokens`` when a completion request gives none (chat's is the context)."""
GENERATING_PATHS = frozenset(
    {
        "/v1/chat/completions",
        COMPLETIONS_PATH,
        BATCH_CHAT_PATH,
        "/v1/responses",
        "/v1/messages",
        GENERATE_PATH,
    }
)
"""The routes that generate text; the others (embeddings, tokenize, render, score...)
generate nothing, whatever their body says."""


@dataclass(frozen=True)
class RequestCost:
    """What a request may cost: ``sequences`` generated (1 for a plain request), each of at
    most ``max_tokens`` tokens (None: as many as the model's context allows)."""

    sequences: int = 1
    max_tokens: int | None = None  # 0: it generates nothing (embeddings, tokenize...)

    def tokens(self, context: int | None) -> int:
        """The most tokens it may generate; ``context``: the model's longest sequence, for a
        request that sets no ``max_tokens`` (0 if unknown: then only what it sets counts)."""
        return self.sequences * (self.max_tokens if self.max_tokens is not None else context or 0)


@dataclass(frozen=True)
class RequestLimits:
    """The limits ``check_request`` applies (from ``Settings``)."""

    fan_out: FanOutLimits
    structured: StructuredOutputLimits


def request_limits_of(settings: Settings) -> RequestLimits:
    """The request limits ``settings`` set."""
    return RequestLimits(fan_out=settings.fan_out, structured=settings.structured_outputs)


def default_request_limits() -> RequestLimits:
    """The settings' default request limits (for routers built without settings)."""
    return RequestLimits(fan_out=FanOutLimits(), structured=StructuredOutputLimits())


def check_request(path: str, body: dict[str, Any], limits: RequestLimits) -> RequestCost:
    """Refuse (400, naming the limit and its ``param``) a body past a fan-out or
    structured-output limit; else say what it may cost."""
    check_constraints(body, limits.structured)
    sampling = body.get("sampling_params") if path == GENERATE_PATH else body
    if not isinstance(sampling, dict):
        return RequestCost()
    prefix = "sampling_params." if path == GENERATE_PATH else ""
    copies = 1
    for name in ("n", "best_of"):
        value = _count(sampling.get(name))
        if value is None:
            continue
        if value > limits.fan_out.max_n:
            raise InvalidRequestError(
                f"'{prefix}{name}' is {value}, more than the limit of {limits.fan_out.max_n} "
                "(fan_out.max_n)",
                param=prefix + name,
            )
        copies = max(copies, value)
    items, param = _items(path, body)
    if items > limits.fan_out.max_batch_items:
        raise InvalidRequestError(
            f"'{param}' holds {items} items, more than the limit of "
            f"{limits.fan_out.max_batch_items} in one request (fan_out.max_batch_items)",
            param=param,
        )
    if path not in GENERATING_PATHS:
        return RequestCost(sequences=copies * items, max_tokens=0)
    return RequestCost(sequences=copies * items, max_tokens=_max_tokens(path, sampling))


def _count(value: Any) -> int | None:
    """``value`` if it is a positive int (not a bool), else None (the engine judges it)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _items(path: str, body: dict[str, Any]) -> tuple[int, str]:
    """How many prompts (or conversations) ``body`` holds, and the field that holds them."""
    if path == BATCH_CHAT_PATH:
        messages = body.get("messages")
        return (len(messages) if isinstance(messages, list) and messages else 1), "messages"
    if path == COMPLETIONS_PATH:
        prompt = body.get("prompt")
        # A list of token ids is one prompt; a list of strings or of token-id lists is many.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return len(prompt), "prompt"
    return 1, "prompt"


def _max_tokens(path: str, sampling: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = _count(sampling.get(name))
        if value is not None:
            return value
    return COMPLETIONS_DEFAULT_MAX_TOKENS if path == COMPLETIONS_PATH else None
