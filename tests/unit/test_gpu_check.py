"""scripts/gpu_check.py's judgements, each shown to pass on a healthy reading and to fail on
the fault it is there to catch (a forked child, a leftover process, a CUDA context in the
owner, memory on the wrong GPU, inside a container too). The readings are what /proc and
nvidia-smi give on a GPU box; no GPU is needed to judge them.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
OWNER, CORE_A, CORE_B, WORKER, HTTP = 10, 11, 12, 13, 14
GPU0, GPU1 = "GPU-0000", "GPU-0001"


@pytest.fixture(scope="module")
def check() -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(SCRIPTS))


PARENTS = {CORE_A: OWNER, CORE_B: OWNER, WORKER: CORE_A, HTTP: OWNER}
SPAWNED = {
    OWNER: "7ffd1000",
    CORE_A: "7ffe2000",
    CORE_B: "7ffc3000",
    WORKER: "7ff14000",
    HTTP: "7ff25000",
}


def test_spawned_processes_pass_and_a_forked_one_fails(check: ModuleType) -> None:
    ok, detail = check.judge_spawned(PARENTS, SPAWNED, aslr=2)
    assert ok and "forked: none" in detail
    # A TP worker forked from its engine core shares the core's stack address (both renamed
    # VLLM::..., which is why names could not tell).
    forked = {**SPAWNED, WORKER: SPAWNED[CORE_A]}
    ok, detail = check.judge_spawned(PARENTS, forked, aslr=2)
    assert not ok and f"forked: [{WORKER}]" in detail
    ok, detail = check.judge_spawned(PARENTS, SPAWNED, aslr=0)
    assert not ok and "ASLR is off" in detail


def test_the_readings_tell_this_process_from_a_fork_of_it(check: ModuleType) -> None:
    """The real readings on this box: a forked child has its parent's stack, an exec'd one not."""
    pid = os.fork()
    if pid == 0:  # the child: wait to be read, then leave without running pytest's cleanup
        time.sleep(5)
        os._exit(0)
    try:
        assert check.stack_start(pid) == check.stack_start(os.getpid())
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    spawned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert check.stack_start(spawned.pid) != check.stack_start(os.getpid())
    finally:
        spawned.kill()
        spawned.wait()


def test_only_http_workers_may_hold_the_listening_socket(check: ModuleType) -> None:
    titles = {CORE_A: "VLLM::EngineCore", HTTP: "appliance: http worker 1"}
    ok, _ = check.judge_socket({"555"}, {HTTP: {"555"}, CORE_A: {"777"}}, titles, 8011)
    assert ok
    ok, detail = check.judge_socket({"555"}, {HTTP: {"555"}, CORE_A: {"555"}}, titles, 8011)
    assert not ok and f"[{CORE_A}]" in detail
    assert not check.judge_socket(set(), {}, titles, 8011)[0]  # nothing listens: no check


def test_a_cuda_context_in_the_owner_fails(check: ModuleType) -> None:
    titles = {OWNER: "owner", HTTP: "appliance: http worker 1"}
    assert check.judge_cuda_context({OWNER: False, HTTP: False}, titles)[0]
    ok, detail = check.judge_cuda_context({OWNER: True, HTTP: False}, titles)
    assert not ok and f"{OWNER} (owner)" in detail


def test_placement_by_pid_where_nvml_lists_ours(check: ModuleType) -> None:
    ours = {CORE_A, CORE_B}
    rows = [(CORE_A, GPU0, 24000), (CORE_B, GPU0, 24000), (999, GPU1, 1000)]
    assert check.judge_placement(rows, ours, GPU0, {}, {}, 40000)[0]
    strayed = [(CORE_A, GPU0, 24000), (CORE_B, GPU1, 24000)]
    ok, detail = check.judge_placement(strayed, ours, GPU0, {}, {}, 40000)
    assert not ok and "on other GPUs: [(12, 'GPU-0001', 24000)]" in detail


def test_placement_inside_a_container_falls_back_to_device_totals(check: ModuleType) -> None:
    """NVML lists host pids there: none is ours, yet the memory is on gpu0 as placed."""
    rows = [(481516, GPU0, 24000), (481517, GPU0, 24000)]
    before = {GPU0: 500, GPU1: 500}
    ok, detail = check.judge_placement(
        rows, {CORE_A, CORE_B}, GPU0, before, {GPU0: 48500, GPU1: 500}, 43000
    )
    assert ok and "by device totals" in detail
    wrong = {GPU0: 24500, GPU1: 24500}
    assert not check.judge_placement(rows, {CORE_A, CORE_B}, GPU0, before, wrong, 43000)[0]


def test_sleep_must_free_memory(check: ModuleType) -> None:
    assert check.judge_sleep("sleeping", 48000, 2500)[0]
    assert not check.judge_sleep("sleeping", 48000, 48000)[0]
    assert not check.judge_sleep("ready", 48000, 2500)[0]


def test_shutdown_judges_processes_collected_before_it(check: ModuleType) -> None:
    collected = {CORE_A, CORE_B, WORKER}
    assert check.judge_shutdown(0, collected, set(), 500, 600)[0]
    # The TP worker outlived its core: re-parented to init, it is no longer below the
    # appliance, but it was collected first.
    ok, detail = check.judge_shutdown(0, collected, {WORKER, 4242}, 500, 600)
    assert not ok and f"still running: [{WORKER}]" in detail
    assert not check.judge_shutdown(0, collected, set(), 500, 24500)[0]  # memory not back
    assert not check.judge_shutdown(1, collected, set(), 500, 500)[0]


def test_process_readings_on_this_box(check: ModuleType) -> None:
    me = os.getpid()
    assert check.process_table()[me] == os.getppid()
    assert me in check.descendants(os.getppid())
    assert check.alive([me, 2**22 + 7]) == {me}


def test_every_http_process_must_answer(check: ModuleType) -> None:
    assert check.judge_workers(["0", "1", "1", "0"], 2)[0]
    ok, detail = check.judge_workers(["0", "0", "0"], 2)  # the worker never attached
    assert not ok and "['0'] of 2" in detail


def test_tensor_parallel_needs_memory_on_each_of_its_gpus(check: ModuleType) -> None:
    ours = {CORE_A, WORKER, HTTP}
    both = [(CORE_A, GPU0, 12000), (WORKER, GPU1, 12000)]
    ok, detail = check.judge_tensor_parallel(both, ours, [GPU0, GPU1], {}, {}, 10000, "Red")
    assert ok and "by pid" in detail and "short: none" in detail
    # tensor_parallel_size ignored: one worker, everything on gpu0, nothing on gpu1.
    one = [(CORE_A, GPU0, 24000)]
    ok, detail = check.judge_tensor_parallel(one, ours, [GPU0, GPU1], {}, {}, 10000, "Red")
    assert not ok and f"short: {{'{GPU1}': 0}}" in detail
    assert not check.judge_tensor_parallel(both, ours, [GPU0, GPU1], {}, {}, 10000, "")[0]
    # In a container (NVML lists host pids): each GPU's gain decides.
    host_pids = [(481516, GPU0, 12000), (481517, GPU1, 12000)]
    before = {GPU0: 500, GPU1: 500}
    gained = {GPU0: 12500, GPU1: 12500}
    ok, detail = check.judge_tensor_parallel(
        host_pids, ours, [GPU0, GPU1], before, gained, 10000, "R"
    )
    assert ok and "by device totals" in detail
    lopsided = {GPU0: 24500, GPU1: 500}
    args = (host_pids, ours, [GPU0, GPU1], before, lopsided, 10000, "R")
    assert not check.judge_tensor_parallel(*args)[0]


def test_lora_must_be_listed_and_change_the_answer(check: ModuleType) -> None:
    listed = ["check-tp", "check-lora"]
    ok, detail = check.judge_lora(listed, "check-lora", " red, blue", " RED! BLUE!")
    assert ok and "differs from" in detail
    # The engine answered the adapter's name with the base weights (LoRA not applied).
    ok, detail = check.judge_lora(listed, "check-lora", " red, blue", " red, blue")
    assert not ok and "EQUALS" in detail
    ok, detail = check.judge_lora(["check-tp"], "check-lora", " red, blue", " RED!")
    assert not ok and "NOT listed" in detail


def test_what_placement_holds_for_a_sleeper_must_cover_what_it_keeps(check: ModuleType) -> None:
    # By pid: the sleeper's processes still hold 1.6 GiB; placement measured and holds 1.62.
    ok, detail = check.judge_sleep_residue(1.62, 24.7, 22000, 1640)
    assert ok and "its pids hold 1640 MiB" in detail
    # The fault: placement assumes only its 1 GiB headroom stays, the sleeper keeps 2.4 GiB.
    ok, detail = check.judge_sleep_residue(1.0, 24.7, 22000, 2450)
    assert not ok and "placement holds 1024 MiB" in detail
    # In a container: reservation (24.7 GiB = 25292 MiB) less what the sleep freed.
    ok, detail = check.judge_sleep_residue(1.0, 24.7, 22000, None)
    assert not ok and "3292 MiB" in detail
    assert check.judge_sleep_residue(3.3, 24.7, 22000, None)[0]
    assert not check.judge_sleep_residue(None, 24.7, 22000, None)[0]
