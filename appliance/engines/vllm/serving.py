"""vLLM's OpenAI serving layer for one engine: its app, request models, replies and usage."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from appliance.engines.base import Endpoint, JSONReply, Reply, StreamReply
from appliance.engines.usage import Usage, usage_in_json
from appliance.errors import InvalidRequestError, WrongTaskError

log = logging.getLogger("appliance.engine")


def request_types() -> dict[Endpoint, TypeAdapter[Any]]:
    """vLLM's request models; a TypeAdapter each, since the embedding request is a union."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return {
        Endpoint.CHAT: TypeAdapter(ChatCompletionRequest),
        Endpoint.COMPLETIONS: TypeAdapter(CompletionRequest),
        Endpoint.EMBEDDINGS: TypeAdapter(EmbeddingRequest),
    }


def vllm_app(args: argparse.Namespace, tasks: Any, model_config: Any) -> Any:
    """The FastAPI app ``vllm serve`` builds for this model, its routes and error handlers.

    Its middleware is dropped: CORS, keys and request ids are the appliance's, and vLLM's
    Prometheus instrumentation would count into a registry nobody reads (the appliance has
    its own metrics).
    """
    from vllm.entrypoints.launchers.app import build_app

    # build_app imports SageMaker's hosting standards, which reconfigure logging (the root
    # level goes to ERROR, which silenced the appliance's access log): put it back.
    with _logging_kept():
        app = build_app(args, tuple(tasks), model_config)
    app.user_middleware.clear()
    return app


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Restore the root logger and every existing logger's level, handlers and switches."""
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved = {
        name: (logger.level, list(logger.handlers), logger.disabled, logger.propagate)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    try:
        yield
    finally:
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, (level, handlers, disabled, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.disabled = disabled
            logger.propagate = propagate


def routes_of(app: Any) -> frozenset[str]:
    """``"METHOD path"`` for every route of vLLM's app."""
    routes = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            routes.add(f"{method} {route.path}")
    return frozenset(routes)


def invalid_request(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = first.get("msg", "invalid request")
    count = exc.error_count()
    more = f" (and {count - 1} more problem(s))" if count > 1 else ""
    return InvalidRequestError(f"{param}: {message}{more}" if param else message, param=param)


async def encode_stream(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """vLLM yields ready-made SSE strings; encode each once, touch nothing else."""
    try:
        async for chunk in chunks:
            yield chunk.encode()
    finally:
        # Closing vLLM's generator is what aborts the request in the engine when the
        # client goes away mid-stream.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def handler_of(state: Any, endpoint: Endpoint, model: str) -> Any:
    """vLLM's serving object for ``endpoint`` in the app state ``state``.

    Raises:
        WrongTaskError: ``model``'s engine does not serve ``endpoint``.
    """
    name = {
        Endpoint.CHAT: "openai_serving_chat",
        Endpoint.COMPLETIONS: "openai_serving_completion",
        Endpoint.EMBEDDINGS: "serving_embedding",
    }[endpoint]
    handler = getattr(state, name, None)
    if handler is None:
        raise WrongTaskError(f"model {model!r} does not serve /v1/{endpoint.value}", param="model")
    return handler


async def serve_endpoint(
    handler: Any,
    request_types: dict[Endpoint, TypeAdapter[Any]],
    endpoint: Endpoint,
    body: dict[str, Any],
    request: Request,
    on_error: Callable[[Exception], JSONReply],
) -> Reply:
    """Validate ``body`` with vLLM's request model and hand it to ``handler``, vLLM's serving
    object; ``on_error`` answers what vLLM raises."""
    try:
        parsed = request_types[endpoint].validate_python(body)
    except ValidationError as exc:
        raise invalid_request(exc) from None
    except Exception as exc:  # vLLM's own validators raise VLLMValidationError and kin
        return on_error(exc)
    try:
        if endpoint is Endpoint.EMBEDDINGS:
            response = await handler(parsed, request)
            return JSONReply(
                status_code=response.status_code,
                body=bytes(response.body),
                usage=usage_in_json(response.body) if response.status_code == 200 else None,
            )
        if endpoint is Endpoint.CHAT:
            result = await handler.create_chat_completion(parsed, request)
        else:
            result = await handler.create_completion(parsed, request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return on_error(exc)
    if hasattr(result, "__aiter__"):
        return StreamReply(chunks=encode_stream(result))
    payload = result.model_dump_json().encode()
    error = getattr(result, "error", None)
    if error is not None:
        return JSONReply(status_code=int(error.code), body=payload)
    usage = getattr(result, "usage", None)
    return JSONReply(
        status_code=200,
        body=payload,
        usage=Usage(usage.prompt_tokens, usage.completion_tokens or 0) if usage else None,
    )


def error_reply(model: str, exc: Exception) -> JSONReply:
    """An exception from vLLM's serving layer as the reply vLLM's own rules give it."""
    from vllm.entrypoints.serve.exception_handling.error_response import (
        create_error_response,
    )

    response = create_error_response(exc)
    if response.error.code >= 500:
        log.error("engine error", extra={"model": model, "error": repr(exc)}, exc_info=exc)
    return JSONReply(status_code=response.error.code, body=response.model_dump_json().encode())
