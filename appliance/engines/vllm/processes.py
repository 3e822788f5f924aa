"""Which processes a local engine started: what a stop must see gone before its GPUs are free.

vLLM keeps them on its client: ``AsyncLLM.engine_core.resources`` holds the
``CoreEngineProcManager`` (``engine_manager.processes``) and, with data parallelism, the
``DPCoordinator`` (``coordinator.proc``), as ``BackgroundResources`` in
``vllm/v1/engine/core_client.py`` sets them. Tensor-parallel workers are the cores' children;
``host.device_release`` collects those. Read by attribute: nothing of vLLM is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def core_process_ids(engine: Any, cores: Any = None, *, attached: bool = False) -> tuple[int, ...]:
    """Pids of the engine-core processes behind ``engine`` (an ``AsyncLLM``).

    ``cores`` is what an owner of several clients launched itself (its ``manager`` and
    ``coordinator``; vLLM's client then holds none). Empty when there is no engine, or for an
    ``attached`` client (its cores are its owner's, and outlive it).
    """
    if attached or (engine is None and cores is None):
        return ()
    manager = getattr(cores, "manager", None)
    coordinator = getattr(cores, "coordinator", None)
    if cores is None:
        resources = getattr(getattr(engine, "engine_core", None), "resources", None)
        manager = getattr(resources, "engine_manager", None)
        coordinator = getattr(resources, "coordinator", None)
    procs: list[Any] = list(getattr(manager, "processes", None) or [])
    if coordinator is not None and getattr(coordinator, "proc", None) is not None:
        procs.append(coordinator.proc)
    return _pids(procs)


def _pids(procs: Iterable[Any]) -> tuple[int, ...]:
    # A process that has exited (exitcode set: reaped) is left out: its pid may already be
    # another process's, which a stop would then wait for.
    return tuple(
        int(p.pid)
        for p in procs
        if getattr(p, "pid", None) is not None and getattr(p, "exitcode", None) is None
    )
