"""The first thing to run on a GPU box: does the appliance do there what it was built to do?

    python scripts/gpu_check.py --model Qwen/Qwen2.5-0.5B-Instruct [--gpu 0] [--port 8011]

It runs `appliance doctor`, then starts a real appliance with two engines of one small model
on one GPU (both with sleep mode), and checks, printing PASS or FAIL with the figures:

1. process tree: every engine process was spawned (not forked) and none holds the API's
   listening socket (HTTP workers do, by design);
2. placement: both engines run on the chosen GPU and nowhere else (nvidia-smi);
3. sleep: a greedy answer before, after a level-1 sleep and wake, and after a level-2 sleep and
   wake is the same, and sleeping frees GPU memory;
4. shutdown: SIGTERM stops the appliance and leaves no process on the GPU.

Exits 1 if any check fails. The README's GPU section says what the output should look like.
Needs the CUDA build (`make EXTRA=gpu venv`) and the model reachable (hub or cache).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

PROMPT = "The three primary colours are"
RESULTS: list[tuple[str, bool, str]] = []


def report(check: str, ok: bool, detail: str) -> None:
    """Record and print one check's outcome."""
    RESULTS.append((check, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {check}: {detail}", flush=True)


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``condition`` until it holds; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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


def socket_inodes(pid: int) -> set[str]:
    """Socket inodes among the open file descriptors of ``pid``."""
    found = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def gpu_processes() -> list[tuple[int, str, int]]:
    """(pid, GPU UUID, MiB) of every compute process, from nvidia-smi."""
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        pid, uuid, mib = (part.strip() for part in line.split(","))
        rows.append((int(pid), uuid, int(mib)))
    return rows


def gpu_uuid(index: int) -> str:
    out = subprocess.run(
        ["nvidia-smi", "-i", str(index), "--query-gpu=uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip()


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


def sleep_cycle(client: httpx.Client, model: str, level: int, before: str) -> None:
    used_awake = sum(mib for _, _, mib in gpu_processes())
    started = time.monotonic()
    client.post(f"/admin/models/{model}/sleep", params={"level": level}).raise_for_status()
    slept = time.monotonic() - started
    status = model_status(client, model)
    used_asleep = sum(mib for _, _, mib in gpu_processes())
    report(
        f"sleep level {level}",
        status.get("state") == "sleeping" and used_asleep < used_awake,
        f"state {status.get('state')}, GPU memory {used_awake} -> {used_asleep} MiB "
        f"in {slept:.1f}s",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to use")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--share", type=float, default=0.3, help="memory_share of each engine")
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
    log = (workdir / "appliance.log").open("w")
    print(f"starting the appliance (log: {workdir / 'appliance.log'})", flush=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "up",
            "--config",
            str(workdir / "models.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300)
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

        engines = descendants(server.pid)
        parent = cmdline(server.pid)
        forked = [pid for pid in engines if cmdline(pid) == parent]
        report(
            "spawned, not forked",
            not forked,
            f"{len(engines)} processes below the appliance; forked: {forked or 'none'}",
        )
        listening = listening_inodes(args.port)
        # HTTP workers (appliance up --workers, one per GPU by default) accept from it by
        # design; no other process below the appliance may hold it.
        holders = [
            pid
            for pid in engines
            if socket_inodes(pid) & listening
            and not cmdline(pid).startswith("appliance: http worker")
        ]
        report(
            "listening socket not inherited",
            bool(listening) and not holders,
            f"port {args.port} socket held by children other than HTTP workers: "
            f"{holders or 'none'}",
        )
        uuid = gpu_uuid(args.gpu)
        mine = [row for row in gpu_processes() if row[0] in engines]
        elsewhere = [row for row in mine if row[1] != uuid]
        report(
            "placement",
            len(mine) >= 2 and not elsewhere,
            f"engine processes on the GPU: {[(pid, mib) for pid, _, mib in mine]}; "
            f"on other GPUs: {elsewhere or 'none'}",
        )

        before = answer(client, "check-a")
        report("greedy answer", bool(before), repr(before))
        sleep_cycle(client, "check-a", 1, before)
        sleep_cycle(client, "check-a", 2, before)
        report("other engine untouched", answer(client, "check-b") == before, "check-b answers")
    except Exception as exc:
        report("run", False, str(exc))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        leftover = [row for row in gpu_processes() if row[0] in descendants(server.pid)]
        report("shutdown", code == 0 and not leftover, f"exit {code}; left on the GPU: {leftover}")
        log.close()
    failed = [check for check, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
