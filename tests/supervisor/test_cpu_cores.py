"""CPU core binding: reading the host's cores from sysfs, and choosing cores per engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.supervisor.cpu_cores import (
    CpuCore,
    choose_cores,
    default_thread_count,
    read_cpu_cores,
)


def fake_sysfs(root: Path, cpus: dict[int, tuple[int, int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: cpu -> (package, core, node)."""
    for cpu, (package, core, node) in cpus.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
        (root / f"cpu{cpu}" / f"node{node}").mkdir()
    return root


def cores(*spec: tuple[int, int]) -> tuple[CpuCore, ...]:
    return tuple(CpuCore(i, n) for i, n in spec)


TWO = cores((0, 0), (1, 0))  # this CI machine: 2 cores, one node
TWO_NODES = cores(*[(i, 0) for i in range(4)], *[(i, 1) for i in range(4, 8)])


def test_reads_one_cpu_per_physical_core_and_its_node(tmp_path: Path) -> None:
    # 2 sockets x 2 cores x 2 threads; siblings are (0, 4), (1, 5), (2, 6), (3, 7).
    layout = {cpu: (cpu % 4 // 2, cpu % 2, cpu % 4 // 2) for cpu in range(8)}
    root = fake_sysfs(tmp_path, layout)
    found = read_cpu_cores(range(8), sys_cpu=root)
    # The last sibling of each core is kept, as vLLM's own binding does.
    assert found == cores((4, 0), (5, 0), (6, 1), (7, 1))


def test_reads_only_the_allowed_cpus(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {cpu: (0, cpu, 0) for cpu in range(4)})
    assert read_cpu_cores([1, 3], sys_cpu=root) == cores((1, 0), (3, 0))


def test_without_topology_every_cpu_is_a_core_on_node_0(tmp_path: Path) -> None:
    assert read_cpu_cores([0, 1, 2], sys_cpu=tmp_path / "missing") == cores((0, 0), (1, 0), (2, 0))


def test_reads_this_host() -> None:
    found = read_cpu_cores()
    assert found and len({c.id for c in found}) == len(found)


def test_default_is_a_node_but_one_as_vllm_chooses() -> None:
    assert default_thread_count(TWO) == 1
    assert default_thread_count(cores((0, 0))) == 1
    assert default_thread_count(TWO_NODES) == 3
    assert default_thread_count(()) == 1


def test_first_engine_gets_what_vllm_would_choose() -> None:
    assert choose_cores(1, TWO, []) == (0,)
    assert choose_cores(3, TWO_NODES, []) == (0, 1, 2)


def test_second_engine_gets_other_cores() -> None:
    assert choose_cores(1, TWO, [(0,)]) == (1,)
    # The other node is free: the whole engine goes there, not one core left on node 0.
    assert choose_cores(3, TWO_NODES, [(0, 1, 2)]) == (4, 5, 6)


def test_cores_are_shared_only_when_none_is_free() -> None:
    assert choose_cores(1, TWO, [(0,), (1,)]) == (0,)
    assert choose_cores(1, TWO, [(0,), (1,), (0,)]) == (1,)
    assert choose_cores(2, TWO, [(0,)]) == (0, 1)


def test_stays_on_one_node_when_one_has_room() -> None:
    # Node 0 has one core left, node 1 is free: the 2-thread engine goes to node 1.
    assert choose_cores(2, TWO_NODES, [(0, 1, 2)]) == (4, 5)
    # A node's spare core is used before a busy node's.
    assert choose_cores(1, TWO_NODES, [(0, 1, 2), (4, 5, 6)]) == (3,)


def test_more_threads_than_any_node_spreads_over_nodes() -> None:
    assert choose_cores(6, TWO_NODES, [(0,)]) == (1, 2, 3, 4, 5, 6)
    assert choose_cores(16, TWO_NODES, []) == tuple(range(8))


@pytest.mark.parametrize("threads", [0, -1])
def test_nothing_to_bind(threads: int) -> None:
    assert choose_cores(threads, TWO, []) == ()
    assert choose_cores(2, (), []) == ()


def test_choice_is_deterministic() -> None:
    taken = [(1,), (4, 5)]
    assert len({choose_cores(2, TWO_NODES, taken) for _ in range(20)}) == 1
