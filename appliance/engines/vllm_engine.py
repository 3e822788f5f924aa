"""The local engine: an in-process vLLM ``AsyncLLM`` and vLLM's own OpenAI serving layer.

This is the only module that imports vLLM. Its module paths move between vLLM releases
(the project pins one version), so every such import lives here and nowhere else.

Per engine we build what ``vllm serve`` builds for its one model: the engine client from
vLLM's own argument parser (so engine settings are validated by vLLM itself) and, with
``init_app_state``, that model's chat, completion and embedding serving objects. Requests are
then handed to those objects unchanged: the appliance re-implements no OpenAI semantics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import State
from starlette.requests import Request

from appliance.catalogue.schema import ModelSpec, Task
from appliance.engines.base import Endpoint, EngineStats, JSONReply, Reply, StreamReply, Usage
from appliance.errors import ConfigError, EngineError, InvalidRequestError, WrongTaskError

log = logging.getLogger("appliance.engine")

# Environment variables are read by vLLM's engine processes when they are spawned, so a
# per-engine value (CUDA_VISIBLE_DEVICES, the CPU KV-cache size) is set around the spawn and
# restored after; the lock keeps two spawns from seeing each other's values.
_SPAWN_LOCK = threading.Lock()


def _vllm_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="models.yaml engine"))


class EngineArgsBuilder:
    """Turns a catalogue entry into vLLM's own serve arguments, validated by vLLM's parser."""

    def __init__(self) -> None:
        self._parser: argparse.ArgumentParser | None = None
        self._options: dict[str, argparse.Action] = {}

    @property
    def parser(self) -> argparse.ArgumentParser:
        """vLLM's serve parser, built on first use (building it imports much of vLLM)."""
        if self._parser is None:
            self._parser = _vllm_parser()
            for action in self._parser._actions:
                for option in action.option_strings:
                    self._options[option] = action
        return self._parser

    def _setting_to_argv(self, model: str, key: str, value: Any) -> list[str]:
        option = "--" + key.replace("_", "-")
        action = self._options.get(option)
        if action is None:
            raise ConfigError(
                f"model {model!r}: engine setting {key!r} is not a vLLM engine setting "
                "(see `python -m vllm.entrypoints.openai.api_server --help`)",
                param=f"engine.{key}",
            )
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                return [option if value else "--no-" + key.replace("_", "-")]
            if action.nargs == 0:  # store_true style flag
                return [option] if value else []
            return [option, str(value).lower()]
        if isinstance(value, dict):
            return [option, json.dumps(value)]
        if isinstance(value, list):
            if action.nargs in ("+", "*"):
                return [option, *(str(v) for v in value)]
            return [option, json.dumps(value)]
        if value is None:
            return []
        return [option, str(value)]

    def build(
        self,
        spec: ModelSpec,
        source_path: str,
        *,
        gpu_memory_utilization: float | None = None,
    ) -> argparse.Namespace:
        """Parse ``spec.engine`` with vLLM's parser; raise ``ConfigError`` naming the setting."""
        parser = self.parser
        argv = [
            "--model",
            source_path,
            "--served-model-name",
            spec.name,
            "--tensor-parallel-size",
            str(spec.resources.tensor_parallel_size),
        ]
        if spec.task is Task.EMBED:
            argv += ["--runner", "pooling"]
        if gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
        for key, value in spec.engine.items():
            argv += self._setting_to_argv(spec.name, key, value)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(argv)
        except SystemExit:
            detail = stderr.getvalue().strip().splitlines()
            reason = detail[-1] if detail else "invalid engine settings"
            reason = reason.split("error: ", 1)[-1]
            raise ConfigError(f"model {spec.name!r}: engine settings: {reason}") from None
        try:
            from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

            validate_parsed_serve_args(args)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model {spec.name!r}: engine settings: {exc}") from None
        return args


class _StatsRecorder:
    """Keeps the latest scheduler statistics vLLM reports, for metrics."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage: float | None = None

    def factory(self) -> Any:
        """A vLLM stat-logger factory whose loggers write into this recorder."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        recorder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    recorder.running = scheduler_stats.num_running_reqs
                    recorder.waiting = scheduler_stats.num_waiting_reqs
                    recorder.kv_cache_usage = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


def _unexposed_prometheus_logger() -> Any:
    """A stand-in for vLLM's Prometheus stat logger, which does nothing.

    vLLM adds a ``PrometheusStatLogger`` to every ``AsyncLLM`` unless it is handed one. Its
    metrics go to prometheus-client's global registry, which the appliance never exposes (it
    has its own, fed by ``_StatsRecorder``), yet it costs about 4% of the API process's CPU
    under load: work for nobody. Handing vLLM this subclass keeps it from adding the real one.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class _Unexposed(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            pass  # registers nothing

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log(self) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return _Unexposed


class VLLMEngine:
    """One local model: vLLM's ``AsyncLLM`` in this process, and its OpenAI serving layer."""

    def __init__(
        self,
        spec: ModelSpec,
        args: argparse.Namespace,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self._args = args
        self._env = dict(env or {})
        self._engine: Any = None
        self._state = State()
        self._stats = _StatsRecorder()
        self._request_types: dict[Endpoint, TypeAdapter[Any]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def _create_engine(self) -> Any:
        """Build the AsyncLLM; runs in a worker thread, since vLLM blocks while it starts."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(self._args)
        with _SPAWN_LOCK:
            saved = {key: os.environ.get(key) for key in self._env}
            os.environ.update(self._env)
            try:
                vllm_config = engine_args.create_engine_config(
                    usage_context=UsageContext.OPENAI_API_SERVER
                )
                return AsyncLLM.from_vllm_config(
                    vllm_config=vllm_config,
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    stat_loggers=[self._stats.factory(), _unexposed_prometheus_logger()],
                    enable_log_requests=False,
                    disable_log_stats=False,
                )
            finally:
                for key, old in saved.items():
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old

    async def start(self) -> None:
        """Start the engine processes and build this model's OpenAI serving layer."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        building = asyncio.ensure_future(asyncio.to_thread(self._create_engine))
        try:
            self._engine = await asyncio.shield(building)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: wait for what it builds and shut that down, so
            # no engine process outlives a cancelled load (SIGTERM while loading, say).
            with contextlib.suppress(Exception):
                engine = await building
                await asyncio.to_thread(engine.shutdown)
            raise
        except Exception as exc:
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc
        try:
            tasks = await self._engine.get_supported_tasks()
            await init_app_state(self._engine, self._state, self._args, tasks)
            self._request_types = _request_types()
        except Exception as exc:
            await self.stop()
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc

    async def stop(self) -> None:
        """Shut the engine's processes down; safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            # shutdown() joins processes; keep the event loop free while it does.
            await asyncio.to_thread(engine.shutdown)

    async def sleep(self, level: int) -> None:
        """vLLM sleep mode: level 1 offloads weights to CPU memory, level 2 drops them."""
        if self._engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        await self._engine.sleep(level)

    async def wake_up(self) -> None:
        """Bring a sleeping engine's memory back."""
        if self._engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        await self._engine.wake_up()

    def is_alive(self) -> bool:
        """False once vLLM reports the engine dead (its core process died or raised)."""
        engine = self._engine
        return engine is not None and not engine.errored

    def stats(self) -> EngineStats:
        """Requests in flight in the engine and its KV-cache usage."""
        engine = self._engine
        unfinished = engine.get_num_unfinished_requests() if engine is not None else 0
        return EngineStats(
            running=unfinished,
            waiting=self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
        )

    # -- requests --------------------------------------------------------------------------

    def _handler(self, endpoint: Endpoint) -> Any:
        name = {
            Endpoint.CHAT: "openai_serving_chat",
            Endpoint.COMPLETIONS: "openai_serving_completion",
            Endpoint.EMBEDDINGS: "serving_embedding",
        }[endpoint]
        handler = getattr(self._state, name, None)
        if handler is None:
            raise WrongTaskError(
                f"model {self.spec.name!r} is a {self.spec.task.value} model and does not "
                f"serve /v1/{endpoint.value}",
                param="model",
            )
        return handler

    async def handle(self, endpoint: Endpoint, body: dict[str, Any], request: Request) -> Reply:
        """Validate ``body`` with vLLM's request model and hand it to vLLM's serving layer."""
        if self._engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        handler = self._handler(endpoint)
        try:
            parsed = self._request_types[endpoint].validate_python(body)
        except ValidationError as exc:
            raise _invalid_request(exc) from None
        except Exception as exc:  # vLLM's own validators raise VLLMValidationError and kin
            return self._error_reply(exc)
        try:
            if endpoint is Endpoint.EMBEDDINGS:
                response = await handler(parsed, request)
                return JSONReply(
                    status_code=response.status_code,
                    body=bytes(response.body),
                    usage=_usage_from_json(response.body) if response.status_code == 200 else None,
                )
            if endpoint is Endpoint.CHAT:
                result = await handler.create_chat_completion(parsed, request)
            else:
                result = await handler.create_completion(parsed, request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._error_reply(exc)
        if hasattr(result, "__aiter__"):
            return StreamReply(chunks=_encode_stream(result))
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

    def _error_reply(self, exc: Exception) -> JSONReply:
        """Map an exception from vLLM's serving layer with vLLM's own rules."""
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        if self._engine is not None and self._engine.errored:
            raise EngineError(f"model {self.spec.name!r}: engine died: {exc}") from exc
        response = create_error_response(exc)
        if response.error.code >= 500:
            log.error(
                "engine error", extra={"model": self.spec.name, "error": repr(exc)}, exc_info=exc
            )
        return JSONReply(status_code=response.error.code, body=response.model_dump_json().encode())


def _request_types() -> dict[Endpoint, TypeAdapter[Any]]:
    """vLLM's request models; a TypeAdapter each, since the embedding request is a union."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    return {
        Endpoint.CHAT: TypeAdapter(ChatCompletionRequest),
        Endpoint.COMPLETIONS: TypeAdapter(CompletionRequest),
        Endpoint.EMBEDDINGS: TypeAdapter(EmbeddingRequest),
    }


def _invalid_request(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = first.get("msg", "invalid request")
    count = exc.error_count()
    more = f" (and {count - 1} more problem(s))" if count > 1 else ""
    return InvalidRequestError(f"{param}: {message}{more}" if param else message, param=param)


def _usage_from_json(body: bytes | memoryview) -> Usage | None:
    try:
        usage = json.loads(bytes(body)).get("usage") or {}
    except (ValueError, AttributeError):
        return None
    return Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0) or 0)


async def _encode_stream(chunks: AsyncIterator[str]) -> AsyncIterator[bytes]:
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


def vllm_version() -> str:
    """The vLLM version this process imports."""
    import vllm

    return str(vllm.__version__)
