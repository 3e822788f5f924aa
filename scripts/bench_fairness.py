"""Fairness benchmark (issue 27): an interactive key's time to first token while another key
floods the same model.

One appliance serves the same model folder under three entries, so one start covers every
case: ``plain`` (no appliance queue: every request goes to vLLM's own first-come scheduler),
``fair`` (``max_in_engine: C``: past C requests the appliance's queue orders them fairly
across keys) and ``prio`` (the same, with ``scheduling_policy: priority`` in vLLM, and the
interactive key's requests asking for a more urgent priority). Then ``vllm serve`` of the
same folder, which has no fairness, under the same load.

Cases, each a row of the report: ``alone`` (the interactive key with no other load), ``plain``,
``fair``, ``prio``, ``batch`` (a batch of N lines from the flood key beside the interactive
key, through the Batch API) and ``vllm``. The interactive key sends one streamed chat at a
time (c=1); the flood key keeps ``--flood`` streamed requests in flight (c=64 by default).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_fairness.py            # the full run
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_fairness.py --quick    # a smoke run

Prints one JSON line per case and a Markdown table (TTFT p50/p99 in seconds, and p50 against
``alone``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
FLOOD_KEY = "sk-bench-flood-0123456789abcdef0123456789"
CHAT_KEY = "sk-bench-chat-0123456789abcdef0123456789"
URGENT = -10


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def entries(model_dir: Path, places: int) -> list[dict[str, Any]]:
    """The three entries over one model folder (see the module docstring)."""
    engine = {"max_model_len": 512, "dtype": "float32"}
    base = {"source": str(model_dir), "task": "generate", "resources": {"memory_gib": 1}}
    return [
        {"name": "plain", **base, "engine": engine},
        {"name": "fair", **base, "engine": engine, "max_in_engine": places},
        {
            "name": "prio",
            **base,
            "engine": {**engine, "scheduling_policy": "priority"},
            "max_in_engine": places,
        },
    ]


@contextlib.contextmanager
def server(argv: list[str], url: str, log: Path, ready: str) -> Iterator[None]:
    """Run ``argv`` until the block ends; wait for ``ready`` to answer 200 first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[2]} exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready; see {log}")
            time.sleep(1)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


async def ttft(client: httpx.AsyncClient, body: dict[str, Any], key: str) -> float:
    """Seconds from sending a streamed chat to its first content event."""
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started


def chat_body(model: str, tokens: int, tag: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"write about {tag}"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        **extra,
    }


@contextlib.asynccontextmanager
async def flooding(
    client: httpx.AsyncClient, model: str, width: int, tokens: int
) -> AsyncIterator[None]:
    """``width`` requests of the flood key in flight for as long as the block runs."""
    stop = asyncio.Event()

    async def one(n: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                await ttft(client, chat_body(model, tokens, f"flood {n}"), FLOOD_KEY)

    tasks = [asyncio.create_task(one(n)) for n in range(width)]
    await asyncio.sleep(2.0)  # let the flood fill the engine and the queue first
    try:
        yield
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def interactive(
    client: httpx.AsyncClient, model: str, count: int, tokens: int, **extra: Any
) -> list[float]:
    """``count`` chats of the interactive key, one at a time: their TTFTs."""
    return [
        await ttft(client, chat_body(model, tokens, f"chat {n}", **extra), CHAT_KEY)
        for n in range(count)
    ]


async def submit_batch(client: httpx.AsyncClient, model: str, lines: int, tokens: int) -> str:
    """A batch of ``lines`` chats from the flood key; its id."""
    auth = {"Authorization": f"Bearer {FLOOD_KEY}"}
    rows = []
    for n in range(lines):
        body = {**chat_body(model, tokens, f"batch {n}"), "stream": False}
        rows.append(
            {"custom_id": f"b{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    up = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=auth
    )
    up.raise_for_status()
    made = await client.post(
        "/v1/batches",
        json={
            "input_file_id": up.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
        headers=auth,
    )
    made.raise_for_status()
    return str(made.json()["id"])


def summary(case: str, times: list[float]) -> dict[str, Any]:
    """p50 and p99 of ``times``."""
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"case": case, "requests": len(times), "p50": statistics.median(times), "p99": p99}


async def appliance_cases(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=args.flood + 16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        n, tokens = args.requests, args.max_tokens
        rows = [summary("alone", await interactive(client, "fair", n, tokens))]
        for case in ("plain", "fair", "prio"):
            extra = {"priority": URGENT} if case == "prio" else {}
            async with flooding(client, case, args.flood, tokens):
                rows.append(summary(case, await interactive(client, case, n, tokens, **extra)))
        await submit_batch(client, "fair", args.batch_lines, tokens)
        await asyncio.sleep(2.0)
        rows.append(summary("batch", await interactive(client, "fair", n, tokens)))
        return rows


async def vllm_case(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.flood + 16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async with flooding(client, "plain", args.flood, args.max_tokens):
            times = await interactive(client, "plain", args.requests, args.max_tokens)
        return summary("vllm", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / ".models" / "tiny-llama")
    parser.add_argument("--flood", type=int, default=64, help="flood key's requests in flight")
    parser.add_argument("--requests", type=int, default=50, help="interactive requests a case")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--places", type=int, default=8, help="max_in_engine of fair and prio")
    parser.add_argument("--batch-lines", type=int, default=1000)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vllm serve case")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    args = parser.parse_args()
    if args.quick:
        args.flood, args.requests, args.max_tokens, args.batch_lines = 8, 5, 16, 20
    work = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    (work / "models.yaml").write_text(
        yaml.safe_dump({"models": entries(args.model_dir, args.places)})
    )
    keys = work / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "flood", "key": FLOOD_KEY},
                    {"name": "chat", "key": CHAT_KEY, "priority_range": [URGENT, 1000]},
                ]
            }
        )
    )
    keys.chmod(0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "appliance", "up", "--config", str(work / "models.yaml")]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--api-keys", str(keys)]
    with server(argv, url, work / "appliance.log", "/ready"):
        rows = asyncio.run(appliance_cases(url, args))
    if not args.no_vllm:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        vllm += ["--model", str(args.model_dir), "--served-model-name", "plain"]
        vllm += ["--max-model-len", "512", "--dtype", "float32", "--port", str(port)]
        with server(vllm, url, work / "vllm.log", "/health"):
            rows.append(asyncio.run(vllm_case(url, args)))
    alone = rows[0]["p50"]
    for row in rows:
        row["p50_vs_alone"] = row["p50"] / alone if alone else None
        print(json.dumps(row))
    print("\n| case | requests | TTFT p50 (s) | TTFT p99 (s) | p50 / alone |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['requests']} | {row['p50']:.3f} | {row['p99']:.3f} | "
            f"{row['p50_vs_alone']:.2f} |"
        )
    print(f"\nlogs in {work}")


if __name__ == "__main__":
    main()
