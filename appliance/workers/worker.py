"""An HTTP worker process: ``python -m appliance.workers.worker``, started by the owner.

It reads its ``WorkerStart`` from stdin, connects to the owner's control channel and serves
the shared listening socket until SIGTERM, when it finishes its requests and exits.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import sys
from typing import Any

from appliance.workers.pool import WorkerStart


def main() -> None:
    """Run one worker until it is told to stop."""
    start: WorkerStart = pickle.load(sys.stdin.buffer)  # from the owner, our parent
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    import setproctitle

    setproctitle.setproctitle(f"appliance: http worker {start.index}")
    from appliance.logs import configure_logging

    configure_logging(start.settings.log_level)
    import uvloop

    uvloop.run(_serve(start))


async def _serve(start: WorkerStart) -> None:
    import uvicorn

    from appliance.engines.factory import EngineFactory
    from appliance.supervisor.lending_board import LendingBoard
    from appliance.workers.attached_engines import AttachedEngines
    from appliance.workers.control import ControlClient
    from appliance.workers.figures_to_owner import FiguresToOwner
    from appliance.workers.proxy import OwnerProxy
    from appliance.workers.scheduler_figures import UnsentSnapshots
    from appliance.workers.worker_app import create_worker_app

    settings = start.settings

    async def flush(_: dict[str, Any]) -> None:
        await figures.flush()

    async def attach(args: dict[str, Any]) -> None:
        engines.attach_ahead(list(args.get("links", [])))

    control = ControlClient(
        start.control_path, start.token, start.index, {"flush": flush, "attach": attach}
    )
    # Sent with the figures: the gauges vLLM gave this worker's clients (see there).
    figures = FiguresToOwner(
        control, schedulers=UnsentSnapshots(lambda: engines.scheduler_snapshots())
    )
    factory = EngineFactory(
        base_dir=settings.config_path.resolve().parent,
        cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        # vLLM's per-step figures of this worker's clients go to the owner's /metrics.
        figures=figures if settings.engine_metrics else None,
    )
    engines = AttachedEngines(factory, start.index)
    # Before serving: a first attach must not have to import vLLM and torch (see there).
    await asyncio.to_thread(factory.import_client_modules)
    await control.connect()
    app = create_worker_app(
        settings,
        index=start.index,
        control=control,
        figures=figures,
        engines=engines,
        owner=OwnerProxy(start.owner_path, start.token),
        board=LendingBoard.attach(start.board_path, settings.auth.rate_windows()),
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        http="httptools",
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        timeout_keep_alive=75,
        limit_concurrency=settings.max_connections,
    )
    server = uvicorn.Server(config)
    listener = socket.socket(fileno=start.listen_fd)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    # Without the owner there is nothing to serve: stop as if told to.
    gone = asyncio.create_task(control.closed.wait())
    await asyncio.wait({serving, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        server.should_exit = True
        await serving


if __name__ == "__main__":
    main()
