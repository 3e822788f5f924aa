"""scripts/gpu_check.py's judgements: pure functions over what /proc, nvidia-smi and the
appliance's API report, each shown to pass on a healthy reading and to fail on the fault it is
there to catch in tests/unit/test_gpu_check.py (no GPU needed to judge)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# What an engine's release may leave on the GPU beyond the baseline (driver bookkeeping).
SLACK_MIB = 256


def judge_spawned(
    parents: Mapping[int, int], stacks: Mapping[int, str | None], aslr: int
) -> tuple[bool, str]:
    """Whether each process was exec'd (spawned) rather than forked from its parent.

    ``parents`` maps pid -> parent pid, ``stacks`` pid -> the start of its ``[stack]``
    mapping. fork copies the parent's address space, stack included, to the same address;
    exec builds a fresh one at a random address (ASLR). With ASLR off nothing can be told.
    """
    if aslr == 0:
        return False, "cannot tell: ASLR is off (kernel.randomize_va_space=0)"
    forked = [
        pid
        for pid, parent in parents.items()
        if stacks.get(pid) is not None and stacks.get(pid) == stacks.get(parent)
    ]
    return not forked, f"{len(parents)} processes below the appliance; forked: {forked or 'none'}"


def judge_socket(
    listening: set[str], held: Mapping[int, set[str]], titles: Mapping[int, str], port: int
) -> tuple[bool, str]:
    """No process but an HTTP worker may hold the API's listening socket."""
    holders = [
        pid
        for pid, inodes in held.items()
        if inodes & listening and not titles.get(pid, "").startswith("appliance: http worker")
    ]
    return bool(listening) and not holders, (
        f"port {port} socket held by children other than HTTP workers: {holders or 'none'}"
    )


def judge_cuda_context(uvm_open: Mapping[int, bool], titles: Mapping[int, str]) -> tuple[bool, str]:
    """Neither the owner nor an HTTP worker may have made a CUDA context (/dev/nvidia-uvm is
    opened by CUDA's initialisation, not by NVML, which the owner uses for readings)."""
    with_context = [f"{pid} ({titles.get(pid, '?')})" for pid, open_ in uvm_open.items() if open_]
    return not with_context, f"CUDA initialised in: {with_context or 'none'}"


def judge_placement(
    rows: Iterable[tuple[int, str, int]],
    ours: set[int],
    uuid: str,
    used_before: Mapping[str, int],
    used_now: Mapping[str, int],
    expected_mib: int,
) -> tuple[bool, str]:
    """The engines' memory is on GPU ``uuid`` only.

    ``rows`` are NVML's (pid, GPU UUID, MiB). Where NVML lists our pids, they decide; inside
    a container it lists host pids, and the device totals decide: ``uuid`` gained at least
    ``expected_mib`` and no other GPU gained more than the slack.
    """
    rows = list(rows)
    mine = [row for row in rows if row[0] in ours]
    if mine:
        elsewhere = [row for row in mine if row[1] != uuid]
        return len(mine) >= 2 and not elsewhere, (
            f"engine processes on the GPU: {[(pid, mib) for pid, _, mib in mine]}; "
            f"on other GPUs: {elsewhere or 'none'}"
        )
    gained = {u: used_now.get(u, 0) - used_before.get(u, 0) for u in used_now}
    others = {u: g for u, g in gained.items() if u != uuid and g > SLACK_MIB}
    ok = gained.get(uuid, 0) >= expected_mib and not others
    return ok, (
        f"NVML lists none of our pids (a container?): by device totals, {uuid} gained "
        f"{gained.get(uuid, 0)} MiB (expected {expected_mib}+), other GPUs: {others or 'none'}"
    )


def judge_workers(seen: Iterable[str], workers: int) -> tuple[bool, str]:
    """Every HTTP process (the owner and each worker, all clients of the engines) answered."""
    answered = sorted(set(seen))
    return len(answered) == workers, f"answers from processes {answered} of {workers}"


def judge_sleep(state: str | None, awake_mib: int, asleep_mib: int) -> tuple[bool, str]:
    """A sleep leaves the model sleeping and the GPU's used memory lower."""
    return state == "sleeping" and asleep_mib < awake_mib, (
        f"state {state}, GPU memory {awake_mib} -> {asleep_mib} MiB"
    )


def judge_shutdown(
    code: int | None, collected: set[int], alive: set[int], baseline_mib: int, after_mib: int
) -> tuple[bool, str]:
    """SIGTERM exits 0, every process collected before it is gone, the GPU's memory is back."""
    leftover = sorted(collected & alive)
    back = after_mib <= baseline_mib + SLACK_MIB
    return code == 0 and not leftover and back, (
        f"exit {code}; still running: {leftover or 'none'}; GPU memory {after_mib} MiB "
        f"(before the start: {baseline_mib})"
    )


def judge_tensor_parallel(
    rows: Iterable[tuple[int, str, int]],
    ours: set[int],
    uuids: list[str],
    used_before: Mapping[str, int],
    used_now: Mapping[str, int],
    expected_mib: int,
    answer: str,
) -> tuple[bool, str]:
    """A tensor-parallel engine answered and has its memory on *each* of its GPUs (one worker
    per GPU): by our pids where NVML lists them, else (a container) by each GPU's gain."""
    rows = list(rows)
    mine = [row for row in rows if row[0] in ours]
    if mine:
        per_gpu = {u: sum(mib for _, g, mib in mine if g == u) for u in uuids}
        how = "by pid"
    else:
        per_gpu = {u: used_now.get(u, 0) - used_before.get(u, 0) for u in uuids}
        how = "NVML lists none of our pids (a container?): by device totals"
    short = {u: mib for u, mib in per_gpu.items() if mib < expected_mib}
    ok = bool(answer) and not short
    return ok, (
        f"{how}, MiB per GPU {per_gpu} (expected {expected_mib}+ on each); "
        f"short: {short or 'none'}; answer {answer!r}"
    )


def judge_lora(
    listed: Iterable[str], adapter: str, base_answer: str, answer: str
) -> tuple[bool, str]:
    """The adapter is listed and answers, and its greedy answer is not the base model's: a
    request for an adapter the engine served without its weights answers as the base does."""
    listed = set(listed)
    ok = adapter in listed and bool(answer) and answer != base_answer
    return ok, (
        f"{adapter} {'listed' if adapter in listed else 'NOT listed'} in /v1/models; answer "
        f"{answer!r} {'differs from' if answer != base_answer else 'EQUALS'} the base model's"
    )


def judge_sleep_residue(
    held_gib: float | None, reserved_gib: float, freed_mib: int, pid_kept_mib: int | None
) -> tuple[bool, str]:
    """What placement holds for a sleeping engine (``memory_gib`` in its status while it
    sleeps, measured at its sleep) covers what it really still holds on the GPU: its pids'
    memory where NVML lists them, else its reservation less what the sleep freed. Placement
    assuming only its headroom while the context, NCCL and allocations outside vLLM's pool
    stay would start the next engine into memory that is not there."""
    if held_gib is None:
        return False, "the sleeping model's status shows no memory held"
    if pid_kept_mib is not None:
        kept, how = pid_kept_mib, "its pids hold"
    else:
        kept, how = int(reserved_gib * 1024) - freed_mib, "reservation less freed (device totals)"
    held = int(held_gib * 1024)
    return held + SLACK_MIB >= kept, (
        f"placement holds {held} MiB for the sleeper; {how} {kept} MiB"
    )
