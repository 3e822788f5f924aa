"""The first thing to run on a GPU box: does the appliance do there what it was built to do?

    python scripts/gpu_check.py --model Qwen/Qwen2.5-0.5B-Instruct [--gpu 0] [--port 8011]

It runs `appliance doctor`, then starts a real appliance with two engines of one small model
on one GPU (both with sleep mode; two HTTP processes, so the engines have two clients),
and checks, printing PASS or FAIL with the figures:

1. spawned, not forked: every process below the appliance has an address space of its own
   (a forked child shares its parent's stack address; vLLM renames both kinds, so names
   cannot tell);
2. listening socket: no process below the appliance but the HTTP workers holds it;
3. no CUDA context in the owner or the HTTP workers (none has /dev/nvidia-uvm open);
4. placement: the engines' memory is on the chosen GPU and nowhere else (by pid where NVML
   lists ours, else by device totals, as inside a container);
5. sleep: a greedy answer before, after a level-1 and after a level-2 sleep and wake is the
   same, and each sleep frees memory on the GPU (device totals);
6. evict, then load on the same GPU at once: the reload starts and answers the same;
7. every HTTP process serves: the owner and the worker each answer (the multi-client start);
8. shutdown: SIGTERM exits 0, every process collected *before* it is gone, and the GPU's used
   memory is back to what it was before the start.

Exits 1 if any check fails. The README's GPU section says what the output should look like.
Each judgement is a pure function, shown to fail on a simulated fault in tests/unit.
Needs the CUDA build (`make EXTRA=gpu venv`) and the model reachable (hub or cache).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

PROMPT = "The three primary colours are"
RESULTS: list[tuple[str, bool, str]] = []
# What an engine's release may leave on the GPU beyond the baseline (driver bookkeeping).
SLACK_MIB = 256


def report(check: str, ok: bool, detail: str) -> None:
    """Record and print one check's outcome."""
    RESULTS.append((check, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {check}: {detail}", flush=True)


# -- judgements (pure; tests/unit/test_gpu_check.py) ---------------------------------------


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


# -- readings ------------------------------------------------------------------------------


def process_table() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    table: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                table[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(pid: int) -> dict[int, int]:
    """Every process below ``pid``: pid -> parent pid."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            found[child] = parent
            todo.append(child)
    return found


def stack_start(pid: int) -> str | None:
    """Where ``pid``'s [stack] mapping starts, from /proc/PID/maps."""
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if line.endswith("[stack]"):
                return line.split("-", 1)[0]
    except OSError:
        pass
    return None


def aslr() -> int:
    try:
        return int(Path("/proc/sys/kernel/randomize_va_space").read_text())
    except (OSError, ValueError):
        return 2


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def fd_targets(pid: int) -> list[str]:
    """What ``pid``'s open file descriptors point at."""
    found = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                found.append(os.readlink(fd))
            except OSError:
                continue
    except OSError:
        pass
    return found


def socket_inodes(pid: int) -> set[str]:
    """Socket inodes among the open file descriptors of ``pid``."""
    return {t[8:-1] for t in fd_targets(pid) if t.startswith("socket:[")}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    found = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.add(pid)
    return found


def nvidia_smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[part.strip() for part in line.split(",")] for line in out.strip().splitlines()]


def gpu_processes() -> list[tuple[int, str, int]]:
    """(pid, GPU UUID, MiB) of every compute process, from nvidia-smi."""
    rows = nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory")
    return [(int(pid), uuid, int(mib)) for pid, uuid, mib in rows]


def gpu_used() -> dict[str, int]:
    """GPU UUID -> used MiB, the device totals (which a container sees as the host does)."""
    return {uuid: int(mib) for uuid, mib in nvidia_smi("--query-gpu=uuid,memory.used")}


def gpu_uuid(index: int) -> tuple[str, int]:
    """The UUID and total MiB of GPU ``index``."""
    uuid, total = nvidia_smi("-i", str(index), "--query-gpu=uuid,memory.total")[0]
    return uuid, int(total)


# -- the live run ----------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``condition`` until it holds; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def answer(client: httpx.Client, model: str) -> str:
    reply = client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0},
    )
    reply.raise_for_status()
    return str(reply.json()["choices"][0]["text"])


def model_status(client: httpx.Client, model: str) -> dict[str, Any]:
    reply = client.get(f"/admin/models/{model}/status")
    reply.raise_for_status()
    return dict(reply.json())


def sleep_cycle(client: httpx.Client, model: str, level: int, before: str, uuid: str) -> None:
    awake = gpu_used()[uuid]
    started = time.monotonic()
    client.post(f"/admin/models/{model}/sleep", params={"level": level}).raise_for_status()
    slept = time.monotonic() - started
    ok, detail = judge_sleep(model_status(client, model).get("state"), awake, gpu_used()[uuid])
    report(f"sleep level {level}", ok, f"{detail} in {slept:.1f}s")
    started = time.monotonic()
    client.post(f"/admin/models/{model}/wake").raise_for_status()
    woke = time.monotonic() - started
    after = answer(client, model)
    report(
        f"wake from level {level}",
        after == before,
        f"in {woke:.1f}s; greedy answer {'unchanged' if after == before else repr(after)}",
    )


def check_tree(
    server: subprocess.Popen[bytes],
    port: int,
    uuid: str,
    total_mib: int,
    share: float,
    baseline: dict[str, int],
) -> set[int]:
    """The checks on the running appliance's processes; returns every pid below it."""
    tree = descendants(server.pid)
    stacks = {pid: stack_start(pid) for pid in [server.pid, *tree]}
    report("spawned, not forked", *judge_spawned(tree, stacks, aslr()))
    titles = {pid: cmdline(pid) for pid in tree}
    held = {pid: socket_inodes(pid) for pid in tree}
    report(
        "listening socket not inherited", *judge_socket(listening_inodes(port), held, titles, port)
    )
    front = [server.pid] + [p for p, t in titles.items() if t.startswith("appliance: http worker")]
    uvm = {pid: any("nvidia-uvm" in t for t in fd_targets(pid)) for pid in front}
    report(
        "no CUDA context in the owner or workers",
        *judge_cuda_context(uvm, {server.pid: "owner", **titles}),
    )
    expected = int(2 * share * total_mib * 0.9)
    report(
        "placement",
        *judge_placement(gpu_processes(), set(tree), uuid, baseline, gpu_used(), expected),
    )
    return set(tree)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--share", type=float, default=0.3, help="memory_share of each engine")
    parser.add_argument(
        "--workers", type=int, default=2, help="HTTP processes: 2+ checks the multi-client start"
    )
    args = parser.parse_args()

    doctor = subprocess.run([sys.executable, "-m", "appliance", "doctor"], check=False)
    report("appliance doctor", doctor.returncode == 0, f"exit {doctor.returncode}")

    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    entry = {
        "source": args.model,
        "resources": {"memory_share": args.share, "devices": [args.gpu]},
        "engine": {"enable_sleep_mode": True, "max_model_len": 2048},
    }
    catalogue = {"models": [{"name": "check-a", **entry}, {"name": "check-b", **entry}]}
    (workdir / "models.yaml").write_text(yaml.safe_dump(catalogue))
    uuid, total_mib = gpu_uuid(args.gpu)
    baseline = gpu_used()
    log = (workdir / "appliance.log").open("w")
    print(f"starting the appliance (log: {workdir / 'appliance.log'})", flush=True)
    command = [sys.executable, "-m", "appliance", "up", "--config", str(workdir / "models.yaml")]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300)
    collected: set[int] = set()
    try:

        def ready() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"the appliance exited ({server.returncode}); see its log")
            try:
                return client.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        started = time.monotonic()
        wait_for(ready, "/ready", timeout=1200)
        report("two engines on one GPU", True, f"ready in {time.monotonic() - started:.0f}s")
        collected = check_tree(server, args.port, uuid, total_mib, args.share, baseline)

        before = answer(client, "check-a")
        report("greedy answer", bool(before), repr(before))
        seen = []
        for _ in range(8 * args.workers):  # a new connection each: the kernel spreads them
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=60) as fresh:
                reply = fresh.post(
                    "/v1/completions", json={"model": "check-b", "prompt": PROMPT, "max_tokens": 4}
                )
                seen.append(reply.headers.get("X-Appliance-Worker", "?"))
        report("every HTTP process serves", *judge_workers(seen, args.workers))
        sleep_cycle(client, "check-a", 1, before, uuid)
        sleep_cycle(client, "check-a", 2, before, uuid)
        report("other engine untouched", answer(client, "check-b") == before, "check-b answers")
        # A stop, then at once a start on the same GPU: the release must be complete first.
        started = time.monotonic()
        client.post("/admin/models/check-a/unload").raise_for_status()
        client.post("/admin/models/check-a/load").raise_for_status()
        again = answer(client, "check-a")
        report(
            "evict, then load on one GPU",
            again == before,
            f"unload + load in {time.monotonic() - started:.0f}s; answer "
            f"{'unchanged' if again == before else repr(again)}",
        )
        collected |= set(descendants(server.pid))
    except Exception as exc:
        report("run", False, str(exc))
    finally:
        collected |= set(descendants(server.pid))  # before the stop: orphans are lost after
        server.send_signal(signal.SIGTERM)
        try:
            code: int | None = server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        # The driver frees an exited process's memory a moment after it exits.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: gpu_used()[uuid] <= baseline[uuid] + SLACK_MIB, "GPU memory", 30)
        report(
            "shutdown",
            *judge_shutdown(code, collected, alive(collected), baseline[uuid], gpu_used()[uuid]),
        )
        log.close()
    failed = [check for check, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
