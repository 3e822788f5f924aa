"""`appliance up`: validate the catalogue, start the engines, serve the API."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import typer
from rich.console import Console

from appliance.errors import ConfigError

err = Console(stderr=True)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


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
        20.0, help="Seconds in-flight requests get to finish on Ctrl-C / SIGTERM."
    ),
    load_wait: float = typer.Option(
        60.0, help="Seconds a request waits for a loading model before a 503."
    ),
    drain_timeout: float = typer.Option(
        30.0, help="Seconds in-flight requests get to finish when a model is unloaded."
    ),
    max_queue: int = typer.Option(
        512,
        min=1,
        help="Requests in flight or waiting per model before 429 (per-model: max_queue).",
    ),
    log_prompts: bool = typer.Option(
        False, help="Log prompts (truncated) in the access log. Off: no prompt text is logged."
    ),
    restart_tries: int = typer.Option(3, help="Restarts of a dead engine before giving up."),
    min_resident: float = typer.Option(
        30.0,
        min=0,
        help="Seconds a model stays loaded (or awake) before it may be evicted for another; "
        "stops on-demand loads from evicting each other in a loop.",
    ),
    api_keys: Path | None = typer.Option(
        None,
        "--api-keys",
        help="YAML file of API keys (also APPLIANCE_API_KEYS / APPLIANCE_ADMIN_KEYS). "
        "Without keys the API is open.",
    ),
    restart_backoff: float = typer.Option(
        2.0, help="Seconds before the first restart of a dead engine; doubles each try."
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
    max_connections: int = typer.Option(
        1024, min=1, help="Open connections at most; beyond it new requests get 503."
    ),
    max_concurrent_loads: int = typer.Option(
        1, min=1, help="On-demand loads running at once; a request needing another gets 503."
    ),
    loads_per_minute: int = typer.Option(
        6, min=1, help="On-demand loads started per minute; beyond it 429."
    ),
    usage_db: Path | None = typer.Option(
        None, help="SQLite file of per-key usage. Default: usage.db beside the catalogue."
    ),
    quotas: Path | None = typer.Option(
        None,
        "--quotas",
        help="YAML file of token quotas per key: quotas: {NAME: {tokens_per_day, "
        "tokens_per_month}}.",
    ),
    status_page: bool = typer.Option(True, help="Serve the status page at / and /ui."),
    engine_metrics: bool = typer.Option(
        False,
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
    from appliance.api.auth import load_auth_config, with_generated_admin_key
    from appliance.logs import configure_logging
    from appliance.settings import Settings
    from appliance.supervisor.handle import SupervisorLimits
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
        ),
        "log_prompts": log_prompts,
        "usage_db": usage_db,
        "status_page": status_page,
        "engine_metrics": engine_metrics,
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
    try:
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
        options["quotas"] = load_quotas(quotas)
        settings = Settings.model_validate(options)
        app = create_app(settings, startup_view=progress)
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    # Uvicorn drains and shuts down on SIGTERM/SIGINT, then re-raises the signal with the
    # handlers it found; these make that a clean exit (0) rather than death by signal, since
    # by then the shutdown did finish.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        # Clients on the LAN (the OpenAI SDK pools connections) reuse them between requests;
        # uvicorn's 5 s default closes idle ones so soon that a reuse can race the close.
        timeout_keep_alive=75,
        # Past this many open connections uvicorn answers 503 at once instead of queueing.
        limit_concurrency=settings.max_connections,
    )
