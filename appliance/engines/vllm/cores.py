"""One engine, several client processes: the shared engine cores, their link, their watch."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.catalogue.schema import ModelSpec
from appliance.engines.base import EngineLink
from appliance.errors import ConfigError

log = logging.getLogger("appliance.engine")

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
class EngineCores:
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
class LinkPayload:
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
class Attachment:
    """An attached client's link, and its payload read."""

    link: EngineLink
    payload: LinkPayload


def refuse_with_several_clients(vllm_config: Any) -> None:
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


def launch_cores(vllm_config: Any, clients: int) -> EngineCores:
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
            EngineCores(launch.engine_manager, launch.coordinator, [], [], None).shutdown()
        raise
    return EngineCores(
        manager=launch.engine_manager,
        coordinator=launch.coordinator,
        inputs=list(launch.addresses.inputs),
        outputs=list(launch.addresses.outputs),
        stats_update_address=launch.addresses.frontend_stats_publish_address,
    )


def processes_alive(pids: Sequence[tuple[int, float]]) -> bool:
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


def watch_cores(engine: Any, pids: Sequence[tuple[int, float]], stopped: threading.Event) -> None:
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
        if processes_alive(pids):
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


def start_watch(engine: Any, pids: Sequence[tuple[int, float]], model: str) -> threading.Event:
    """Start watching the cores' processes for ``engine``'s client (see ``watch_cores``);
    setting the event returned ends the watch."""
    stopped = threading.Event()
    threading.Thread(
        target=watch_cores,
        args=(engine, pids, stopped),
        name=f"appliance-cores-{model}",
        daemon=True,
    ).start()
    return stopped


def make_link(
    spec: ModelSpec,
    args: argparse.Namespace,
    clients: int,
    vllm_config: Any,
    cores: EngineCores,
    pids: tuple[tuple[int, float], ...],
) -> EngineLink:
    """The owner's ``EngineLink``, once client 0 is up (its config then holds what the
    cores' ready message settled, such as an auto-fitted max_model_len)."""
    import cloudpickle
    from vllm.transformers_utils.config import maybe_register_config_serialize_by_value

    maybe_register_config_serialize_by_value()
    payload = LinkPayload(
        spec=spec,
        args=args,
        vllm_config=cloudpickle.dumps(vllm_config),
        core_pids=pids,
        stats_update_address=cores.stats_update_address,
    )
    return EngineLink(
        model=spec.name,
        client_count=clients,
        inputs=tuple(cores.inputs),
        outputs=tuple(cores.outputs),
        payload=pickle.dumps(payload),
    )


def read_link(link: EngineLink) -> LinkPayload:
    """What ``link.payload`` holds.

    Raises:
        ValueError: the payload was not made by ``make_link``.
    """
    payload = pickle.loads(link.payload)
    if not isinstance(payload, LinkPayload):
        raise ValueError(f"model {link.model!r}: not a link made by this appliance")
    return payload
