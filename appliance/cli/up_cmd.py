"""`appliance up`: validate the catalogue, start the engines, serve the API."""

from __future__ import annotations

import atexit
import os
import signal
import socket
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from appliance.batches.settings import BatchSettings
from appliance.errors import ConfigError
from appliance.runtime_dir import RuntimeDir
from appliance.settings import (
    FanOutLimits,
    OnDemandLimits,
    Settings,
    StoredResponseLimits,
    StructuredOutputLimits,
)
from appliance.supervisor.fair_queue import FairShareSettings
from appliance.supervisor.handle import SupervisorLimits

err = Console(stderr=True)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


# One place for each default: the settings objects; the options below show and use them.
_LIMITS = SupervisorLimits()
_ON_DEMAND = OnDemandLimits()
_FAN_OUT = FanOutLimits()
_STRUCTURED = StructuredOutputLimits()
_STORED = StoredResponseLimits()
_FAIR = FairShareSettings()
_BATCHES = BatchSettings()
_DEFAULT = {
    name: field.default
    for name, field in Settings.model_fields.items()
    if field.default_factory is None
}


def up(
    config: Path = typer.Option(
        Path("models.yaml"), "--config", "-c", help="The catalogue file (models.yaml)."
    ),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    cpu_memory_gib: float | None = typer.Option(
        None, help="Memory CPU engines may use together (no GPU). Default: half the RAM."
    ),
    shutdown_grace: float = typer.Option(
        _DEFAULT["shutdown_grace_seconds"],
        help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM.",
    ),
    load_wait: float = typer.Option(
        _LIMITS.load_wait_seconds, help="Seconds a request waits for a loading model before a 503."
    ),
    drain_timeout: float = typer.Option(
        _LIMITS.drain_seconds,
        help="Seconds in-flight requests get to finish when a model is unloaded.",
    ),
    max_queue: int = typer.Option(
        _LIMITS.max_queue,
        min=1,
        help="Requests in flight or waiting per model before 429 (per-model: max_queue).",
    ),
    log_prompts: bool = typer.Option(
        False, help="Log prompts (truncated) in the access log. Off: no prompt text is logged."
    ),
    restart_tries: int = typer.Option(
        _LIMITS.restart_max_tries, help="Restarts of a dead engine before giving up."
    ),
    min_resident: float = typer.Option(
        _LIMITS.min_resident_seconds,
        min=0,
        help="Seconds a model stays loaded (or awake) before it may be evicted for another; "
        "stops on-demand loads from evicting each other in a loop.",
    ),
    device_release: float = typer.Option(
        _LIMITS.device_release_seconds,
        min=0,
        help="Seconds a stopped GPU engine's devices stay locked waiting for its processes to "
        "exit and its memory to come back; a stop not done by then fails in one line.",
    ),
    api_keys: Path | None = typer.Option(
        None,
        "--api-keys",
        help="YAML file of API keys (also APPLIANCE_API_KEYS / APPLIANCE_ADMIN_KEYS). "
        "Without keys the API is open.",
    ),
    restart_backoff: float = typer.Option(
        _LIMITS.restart_backoff_seconds,
        help="Seconds before the first restart of a dead engine; doubles each try.",
    ),
    allow_anonymous: bool = typer.Option(
        False,
        "--allow-anonymous",
        help="Serve /v1 without a key to anyone who can reach the port (default: loopback "
        "only, or keys). The admin API still needs an admin key off loopback.",
    ),
    generate_admin_key: bool = typer.Option(
        False,
        "--generate-admin-key",
        help="Use the admin key in ~/.config/appliance/admin-key (or $APPLIANCE_ADMIN_KEY_FILE),"
        " made (mode 0600) if missing; the CLI finds it there.",
    ),
    allowed_hosts: list[str] | None = typer.Option(
        None,
        "--allowed-hosts",
        help="A name the Host header may carry (repeatable; '*': any). Default: the names "
        "and addresses of this box.",
    ),
    cors_origin: list[str] | None = typer.Option(
        None, "--cors-origin", help="An origin whose web pages may call the API (repeatable)."
    ),
    media_url_network: list[str] | None = typer.Option(
        None,
        "--media-url-network",
        help="A private network (10.0.0.0/8, say) that media URLs in requests may point to "
        "(repeatable). Default: public addresses only.",
    ),
    disk_reserve_gib: float = typer.Option(
        _DEFAULT["disk_reserve_gib"],
        min=0,
        help="Disk (GiB) a model pull leaves free where the hub cache is; it stops short.",
    ),
    max_connections: int = typer.Option(
        _DEFAULT["max_connections"],
        min=1,
        help="Open connections at most; beyond it new requests get 503.",
    ),
    max_concurrent_loads: int = typer.Option(
        _ON_DEMAND.max_concurrent_loads,
        min=1,
        help="On-demand loads running at once; a request needing another gets 503.",
    ),
    loads_per_minute: int = typer.Option(
        _ON_DEMAND.loads_per_minute,
        min=1,
        help="On-demand loads started per minute; beyond it 429.",
    ),
    max_n: int = typer.Option(
        _FAN_OUT.max_n, min=1, help="Largest n (and best_of) one request may ask for; past it 400."
    ),
    max_batch_items: int = typer.Option(
        _FAN_OUT.max_batch_items,
        min=1,
        help="Most conversations in one /v1/chat/completions/batch request (and prompts in "
        "one /v1/completions request); past it 400.",
    ),
    max_schema_bytes: int = typer.Option(
        _STRUCTURED.max_schema_bytes,
        min=64,
        help="Largest structured-output constraint (JSON schema, regex, grammar), bytes.",
    ),
    max_regex_repeat: int = typer.Option(
        _STRUCTURED.max_regex_repeat,
        min=1,
        help="Largest product of nested repetition bounds in one regex or schema pattern "
        "((a{1,64}){1,64} is 4096); past it 400.",
    ),
    max_stored_responses: int = typer.Option(
        _STORED.max_stored,
        min=1,
        help="Stored Responses API results kept (VLLM_ENABLE_RESPONSES_API_STORE=1); the "
        "oldest go first.",
    ),
    stored_response_age: float = typer.Option(
        _STORED.max_age_seconds, min=1, help="Seconds a stored response is kept."
    ),
    usage_db: Path | None = typer.Option(
        None, help="SQLite file of per-key usage. Default: usage.db beside the catalogue."
    ),
    conversion_cache: Path | None = typer.Option(
        None,
        help="Folder where .gguf sources are converted once into safetensors folders. "
        "Default: $XDG_CACHE_HOME/appliance/converted (~/.cache/appliance/converted).",
    ),
    quotas: Path | None = typer.Option(
        None,
        "--quotas",
        help="YAML file of token quotas per key: quotas: {NAME: {tokens_per_day, "
        "tokens_per_month}}.",
    ),
    status_page: bool = typer.Option(
        _DEFAULT["status_page"], help="Serve the status page at / and /ui."
    ),
    list_aliases: bool = typer.Option(
        _DEFAULT["list_aliases"],
        help="List each model alias in GET /v1/models as a model of its own.",
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        max=64,
        help="HTTP worker processes sharing the port, each a client of every engine "
        "(request parsing, templating, detokenizing and streaming spread over cores). "
        "Default: one per GPU, four cores each at least; 1 on a small box.",
    ),
    fair_share: bool = typer.Option(
        _FAIR.enabled,
        help="Order each local model's waiting requests by priority, then fairly across "
        "keys (off: straight to the engine in arrival order).",
    ),
    queue_wait: float = typer.Option(
        _FAIR.max_wait_seconds,
        min=0.1,
        help="Seconds a request may wait for a place in its model's engine before a 429.",
    ),
    in_engine: int = typer.Option(
        _FAIR.default_in_engine,
        min=1,
        help="Requests let into a model's engine at once when its entry sets neither "
        "max_in_engine nor max_num_seqs.",
    ),
    batch_lines_at_once: int = typer.Option(
        _BATCHES.lines_at_once,
        min=1,
        help="Lines of one batch (Batch API) in flight at once, each at the lowest priority.",
    ),
    batch_max_lines: int = typer.Option(
        _BATCHES.max_lines, min=1, help="Most requests in one batch's input file."
    ),
    batch_max_file_bytes: int = typer.Option(
        _BATCHES.max_file_bytes,
        min=1024,
        help="Largest file POST /v1/files takes (the request body limit caps it too).",
    ),
    engine_metrics: bool = typer.Option(
        _DEFAULT["engine_metrics"],
        "--engine-metrics",
        help="Expose vLLM's own engine figures per model on /metrics (prefix cache, "
        "preemptions, queue/prefill/decode times); costs work on every engine step.",
    ),
) -> None:
    """Start the appliance: every autoload model in the catalogue, behind one OpenAI API."""
    # vLLM reads these at import: no phoning home, and its log lines go through ours (JSON).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    import uvicorn

    from appliance.admin_key import admin_key_file
    from appliance.api.app import create_app
    from appliance.api.auth_file import load_auth_config, with_generated_admin_key
    from appliance.appliance import Appliance
    from appliance.engines.process_env import harden_environment
    from appliance.logs import configure_logging
    from appliance.usage.quotas import load_quotas

    options: dict[str, object] = {
        "config_path": config,
        "host": host,
        "port": port,
        "log_level": log_level,
        "shutdown_grace_seconds": shutdown_grace,
        "limits": SupervisorLimits(
            load_wait_seconds=load_wait,
            drain_seconds=drain_timeout,
            restart_max_tries=restart_tries,
            restart_backoff_seconds=restart_backoff,
            max_queue=max_queue,
            min_resident_seconds=min_resident,
            device_release_seconds=device_release,
        ),
        "log_prompts": log_prompts,
        "usage_db": usage_db,
        "conversion_cache": conversion_cache,
        "status_page": status_page,
        "engine_metrics": engine_metrics,
        "list_aliases": list_aliases,
        "workers": workers,
        "fan_out": FanOutLimits(max_n=max_n, max_batch_items=max_batch_items),
        "structured_outputs": StructuredOutputLimits(
            max_schema_bytes=max_schema_bytes, max_regex_repeat=max_regex_repeat
        ),
        "stored_responses": StoredResponseLimits(
            max_stored=max_stored_responses, max_age_seconds=stored_response_age
        ),
        "disk_reserve_gib": disk_reserve_gib,
        "batches": BatchSettings(
            lines_at_once=batch_lines_at_once,
            max_lines=batch_max_lines,
            max_file_bytes=batch_max_file_bytes,
        ),
        "fair_share": FairShareSettings(
            enabled=fair_share, max_wait_seconds=queue_wait, default_in_engine=in_engine
        ),
    }
    if cpu_memory_gib is not None:
        options["cpu_memory_budget_gib"] = cpu_memory_gib
    configure_logging(log_level)
    progress = None
    if err.is_terminal:
        # A person is watching: readable log lines and each model's load drawn live.
        from appliance.cli.startup_progress import StartupProgress, log_to_console

        log_to_console(err, log_level)
        progress = StartupProgress(err)
    # A 0700 folder for every socket of this run (vLLM's IPC ones too); dead runs' go first.
    # (At exit, however ``up`` returns; a killed run's is removed by the next start.)
    runtime = RuntimeDir.create()
    atexit.register(runtime.close)
    try:
        harden_environment(os.environ, runtime.path)
        auth = load_auth_config(api_keys, os.environ)
        if allow_anonymous:
            auth = auth.model_copy(update={"anonymous": True})
        if generate_admin_key:
            auth = with_generated_admin_key(auth, admin_key_file(os.environ))
        options["auth"] = auth
        options["max_connections"] = max_connections
        options["on_demand"] = {
            "max_concurrent_loads": max_concurrent_loads,
            "loads_per_minute": loads_per_minute,
        }
        if allowed_hosts:
            options["allowed_hosts"] = allowed_hosts
        if cors_origin:
            options["cors_origins"] = cors_origin
        if media_url_network:
            options["media_url_networks"] = media_url_network
        options["quotas"] = load_quotas(quotas)
        settings = Settings.model_validate(options)
        core = Appliance(settings)
        pool = None
        if core.workers > 1:
            from appliance.workers.pool import WorkerPool

            pool = WorkerPool(
                settings, core.workers, _listen(settings.host, settings.port), runtime.path
            )
            core.supervisor.lend_through(pool.board)
        app = create_app(
            settings,
            core,
            startup_view=progress,
            worker_token=pool.token if pool else None,
            with_workers=pool.running if pool else None,
        )
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(
            f"[bold red]error:[/] cannot listen on {host}:{port}: {exc.strerror}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    # Uvicorn drains and shuts down on SIGTERM/SIGINT, then re-raises the signal with the
    # handlers it found; these make that a clean exit (0) rather than death by signal, since
    # by then the shutdown did finish.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    options_uvicorn: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        # Clients on the LAN (the OpenAI SDK pools connections) reuse them between requests;
        # uvicorn's 5 s default closes idle ones so soon that a reuse can race the close.
        "timeout_keep_alive": 75,
        # Past this many open connections uvicorn answers 503 at once instead of queueing.
        "limit_concurrency": settings.max_connections,
    }
    if pool is None:
        uvicorn.run(app, host=settings.host, port=settings.port, **options_uvicorn)
    elif not pool.serve(uvicorn.Config(app, **options_uvicorn)):
        raise typer.Exit(1)  # it did not start, or a worker died: not a clean stop


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket every HTTP process accepts from (workers inherit it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
