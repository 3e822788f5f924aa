"""Which CPU cores a CPU engine's threads are bound to, so that engines do not share cores.

vLLM's CPU worker binds its compute threads to cores (``VLLM_CPU_OMP_THREADS_BIND``). Left to
itself, every engine makes the same choice: the first NUMA node's cores but one (kept for the
engine's scheduler process). Two engines started that way on one host bind to the *same*
cores and spin against each other while the other cores idle. The appliance knows all its
engines, so it hands each one its own cores: the least used cores of the least used NUMA node.
One engine alone gets exactly what vLLM would have chosen.

Reading the host (``read_cpu_cores``) is the only I/O here; choosing (``choose_cores``) is pure.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SYS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class CpuCore:
    """One physical core, named by the logical CPU an engine's thread is bound to."""

    id: int  # the logical CPU number, as the kernel and VLLM_CPU_OMP_THREADS_BIND name it
    node: int  # its NUMA node


def read_cpu_cores(
    allowed: Iterable[int] | None = None, sys_cpu: Path = SYS_CPU
) -> tuple[CpuCore, ...]:
    """The cores this process may run on: one logical CPU per physical core, with its node.

    ``allowed`` defaults to this process's affinity. Of hyper-threaded siblings the last one is
    kept, as vLLM's own automatic binding does (one compute thread per physical core is faster
    than two). Where the topology cannot be read, every allowed CPU counts as a core of node 0.
    """
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    by_core: dict[tuple[int, int], CpuCore] = {}
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = int((topology / "physical_package_id").read_text())
            core = int((topology / "core_id").read_text())
        except (OSError, ValueError):
            package, core = -1, cpu  # no topology: the CPU is its own core
        # Later siblings replace earlier ones: the last logical CPU of each core is kept.
        by_core[(package, core)] = CpuCore(cpu, _node_of(sys_cpu / f"cpu{cpu}"))
    return tuple(sorted(by_core.values(), key=lambda c: c.id))


def default_thread_count(cores: tuple[CpuCore, ...]) -> int:
    """vLLM's own default: the cores of one NUMA node but one, at least one."""
    per_node = Counter(c.node for c in cores)
    return max(1, max(per_node.values(), default=1) - 1)


def choose_cores(
    threads: int, cores: tuple[CpuCore, ...], taken: Iterable[tuple[int, ...]]
) -> tuple[int, ...]:
    """``threads`` core ids for a new engine, beside the engines already bound to ``taken``.

    The engine stays on one NUMA node when one has ``threads`` cores (memory stays local to
    the threads that use it): the node whose least used cores are least shared, then the node
    least used overall. Within it the cores with the fewest engines on them; ties go to the
    lowest numbers, so the same inputs always give the same answer. Cores are shared only when
    too few are free. Returns sorted ids; ``()`` when ``cores`` is empty (binding left to vLLM).
    """
    if not cores or threads < 1:
        return ()
    use = Counter(core_id for binding in taken for core_id in binding)
    nodes = sorted({c.node for c in cores})
    best: tuple[tuple[int, float, int], list[CpuCore]] | None = None
    for node in nodes:
        members = [c for c in cores if c.node == node]
        if len(members) < threads:
            continue
        pick = sorted(members, key=lambda c: (use[c.id], c.id))[:threads]
        load = sum(use[c.id] for c in members) / len(members)
        key = (sum(use[c.id] for c in pick), load, node)
        if best is None or key < best[0]:
            best = (key, pick)
    if best is not None:
        return tuple(sorted(c.id for c in best[1]))
    # No node has enough cores: spread over all of them, least used first.
    spread = sorted(cores, key=lambda c: (use[c.id], c.node, c.id))[:threads]
    return tuple(sorted(c.id for c in spread))


def _node_of(cpu_dir: Path) -> int:
    """The NUMA node of a CPU (its ``nodeN`` entry in sysfs); 0 when none is listed."""
    try:
        for entry in cpu_dir.iterdir():
            if entry.name.startswith("node") and entry.name[4:].isdigit():
                return int(entry.name[4:])
    except OSError:
        pass
    return 0
