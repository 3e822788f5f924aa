"""The first thing to run on a GPU box: does the appliance do there what it was built to do?

    python scripts/gpu_check.py --model Qwen/Qwen2.5-0.5B-Instruct [--gpu 0] [--port 8011]

It runs `appliance doctor --config` on its catalogue (/dev/shm, overheads, whether the
catalogue fits this host), then starts a real appliance with two engines of one small model
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
   same, each sleep frees memory on the GPU (device totals), and what placement holds for
   the sleeper covers what it still holds there;
6. evict, then load on the same GPU at once: the reload starts and answers the same;
7. every HTTP process serves: the owner and the worker each answer (the multi-client start);
8. shutdown: SIGTERM exits 0, every process collected *before* it is gone, and the GPU's used
   memory is back to what it was before the start;
9. with 2+ GPUs (--tp-gpus) a second appliance: one tensor-parallel engine with memory on
   each of its GPUs, and (with --lora) an adapter that is listed and changes the answer;
   then its shutdown, TP workers included. Skipped checks print SKIP.

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import yaml
from gpu_check_judgements import (
    SLACK_MIB,
    judge_cuda_context,
    judge_lora,
    judge_placement,
    judge_shutdown,
    judge_sleep,
    judge_sleep_residue,
    judge_socket,
    judge_spawned,
    judge_tensor_parallel,
    judge_workers,
)

PROMPT = "The three primary colours are"
RESULTS: list[tuple[str, bool, str]] = []


def report(check: str, ok: bool, detail: str) -> None:
    """Record and print one check's outcome."""
    RESULTS.append((check, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {check}: {detail}", flush=True)


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


def skip(check: str, why: str) -> None:
    """A check this run cannot make (printed, neither passed nor failed)."""
    print(f"SKIP  {check}: {why}", flush=True)


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


def by_pid(ours: set[int]) -> dict[int, int]:
    """MiB NVML lists for each of ``ours`` (none inside a container)."""
    return {pid: mib for pid, _, mib in gpu_processes() if pid in ours}


def sleep_cycle(
    client: httpx.Client, model: str, level: int, before: str, uuid: str, ours: set[int]
) -> None:
    reserved = float(model_status(client, model).get("memory_gib") or 0.0)
    awake, pids_awake = gpu_used()[uuid], by_pid(ours)
    started = time.monotonic()
    client.post(f"/admin/models/{model}/sleep", params={"level": level}).raise_for_status()
    slept = time.monotonic() - started
    status, asleep, pids_asleep = model_status(client, model), gpu_used()[uuid], by_pid(ours)
    ok, detail = judge_sleep(status.get("state"), awake, asleep)
    report(f"sleep level {level}", ok, f"{detail} in {slept:.1f}s")
    # The sleeper's processes are those whose memory the sleep lowered (the other engine's
    # stay as they were); without our pids in NVML, device totals decide.
    sleepers = [p for p, mib in pids_awake.items() if mib - pids_asleep.get(p, 0) > SLACK_MIB]
    kept = sum(pids_asleep.get(p, 0) for p in sleepers) if sleepers else None
    report(
        f"what sleep level {level} leaves",
        *judge_sleep_residue(status.get("memory_gib"), reserved, awake - asleep, kept),
    )
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


class Run:
    """One real appliance on ``catalogue``; ``stop`` ends it and judges its shutdown."""

    def __init__(self, workdir: Path, name: str, catalogue: dict[str, Any], args: Any) -> None:
        self.uuids: list[str] = []
        self.baseline = gpu_used()
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(catalogue))
        self.log = (workdir / f"{name}.log").open("w")
        print(f"starting the appliance ({name}; log: {workdir / name}.log)", flush=True)
        command = [sys.executable, "-m", "appliance", "up", "--config", str(path), "--host"]
        command += ["127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)]
        self.server = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300)
        self.collected: set[int] = set()

    def ready(self, check: str) -> None:
        def up() -> bool:
            if self.server.poll() is not None:
                raise RuntimeError(f"the appliance exited ({self.server.returncode}); see its log")
            try:
                return self.client.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        started = time.monotonic()
        wait_for(up, "/ready", timeout=1200)
        report(check, True, f"ready in {time.monotonic() - started:.0f}s")

    def stop(self, check: str) -> None:
        self.collected |= set(descendants(self.server.pid))  # before the stop: orphans are lost
        self.server.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.server.kill()
            code = self.server.wait()

        def used() -> int:
            now = gpu_used()
            return sum(now[u] for u in self.uuids)

        base = sum(self.baseline[u] for u in self.uuids)
        # The driver frees an exited process's memory a moment after it exits.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: used() <= base + SLACK_MIB, "GPU memory", 30)
        report(check, *judge_shutdown(code, self.collected, alive(self.collected), base, used()))
        self.log.close()


def first_run(workdir: Path, args: Any, uuid: str, total_mib: int) -> str:
    """Two engines of one model on one GPU, two HTTP processes: the checks 1-8 above.
    Returns check-a's greedy answer (the base answer the second run compares with)."""
    entry = {
        "source": args.model,
        "resources": {"memory_share": args.share, "devices": [args.gpu]},
        "engine": {"enable_sleep_mode": True, "max_model_len": 2048},
    }
    catalogue = {"models": [{"name": "check-a", **entry}, {"name": "check-b", **entry}]}
    (workdir / "models.yaml").write_text(yaml.safe_dump(catalogue))
    # The doctor with the catalogue: /dev/shm, overheads, and whether it fits this host.
    doctor = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--config", str(workdir / "models.yaml")],
        check=False,
    )
    report("appliance doctor", doctor.returncode == 0, f"exit {doctor.returncode}")
    run = Run(workdir, "one-gpu", catalogue, args)
    run.uuids = [uuid]
    before = ""
    try:
        run.ready("two engines on one GPU")
        client = run.client
        run.collected = check_tree(run.server, args.port, uuid, total_mib, args.share, run.baseline)
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
        sleep_cycle(client, "check-a", 1, before, uuid, run.collected)
        sleep_cycle(client, "check-a", 2, before, uuid, run.collected)
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
    except Exception as exc:
        report("run", False, str(exc))
    finally:
        run.stop("shutdown")
    return before


def second_run(workdir: Path, args: Any, gpus: list[tuple[int, str, int]], base: str) -> None:
    """One engine over ``gpus`` (tensor parallel with 2+) serving ``args.lora`` as an adapter:
    its memory on each GPU, the adapter's answer, and a shutdown that leaves no TP worker."""
    tp = len(gpus)
    entry: dict[str, Any] = {
        "name": "check-tp",
        "source": args.model,
        "resources": {
            "memory_share": args.share,
            "tensor_parallel_size": tp,
            "devices": [index for index, _, _ in gpus],
        },
        "engine": {"max_model_len": 2048},
    }
    if args.lora:
        entry["adapters"] = [{"name": "check-lora", "source": args.lora}]
    run = Run(workdir, "second", {"models": [entry]}, args)
    run.uuids = [uuid for _, uuid, _ in gpus]
    try:
        run.ready(f"one engine over {tp} GPU(s)" + (" with a LoRA adapter" if args.lora else ""))
        run.collected = set(descendants(run.server.pid))
        if tp > 1:
            got = answer(run.client, "check-tp")
            expected = int(args.share * min(total for _, _, total in gpus) * 0.9)
            readings = (gpu_processes(), run.collected, run.uuids, run.baseline, gpu_used())
            tp_ok, tp_detail = judge_tensor_parallel(*readings, expected, got)
            report(f"tensor parallel over {tp} GPUs", tp_ok, tp_detail)
        if args.lora:
            listed = [m["id"] for m in run.client.get("/v1/models").json()["data"]]
            report(
                "LoRA", *judge_lora(listed, "check-lora", base, answer(run.client, "check-lora"))
            )
    except Exception as exc:
        report("second run", False, str(exc))
    finally:
        run.stop("shutdown" + (" (tensor parallel: no worker left)" if tp > 1 else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--share", type=float, default=0.3, help="memory_share of each engine")
    parser.add_argument(
        "--workers", type=int, default=2, help="HTTP processes: 2+ checks the multi-client start"
    )
    parser.add_argument(
        "--tp-gpus",
        default="",
        help="NVML indices for the tensor-parallel check, e.g. 0,1 (default: the first two GPUs "
        "when there are 2+; 'none' skips it)",
    )
    parser.add_argument(
        "--lora", default="", help="a LoRA adapter of --model (hub id or PEFT folder) to check"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    uuid, total_mib = gpu_uuid(args.gpu)
    base = first_run(workdir, args, uuid, total_mib)
    count = len(gpu_used())
    if args.tp_gpus == "none":
        indices = []
    elif args.tp_gpus:
        indices = [int(i) for i in args.tp_gpus.split(",")]
    else:
        indices = [0, 1] if count > 1 else []
    if len(indices) < 2:
        skip("tensor parallel", "one GPU on this box (or --tp-gpus none)")
    if not args.lora:
        skip("LoRA", "no --lora adapter given")
    if len(indices) > 1 or args.lora:
        chosen = indices if len(indices) > 1 else [args.gpu]
        second_run(workdir, args, [(i, *gpu_uuid(i)) for i in chosen], base)
    failed = [check for check, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
