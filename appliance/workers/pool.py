"""The owner's HTTP workers: started, watched and stopped with the appliance.

``appliance up --workers K`` runs the owner (process 0: the model table, the engines, and an
HTTP server of its own) and K-1 worker processes. All K accept connections from one
listening socket, which the workers inherit. Each worker gets at spawn, on its stdin, what it
needs: the settings, its index, the owner's private sockets and the token that proves it is
ours. A worker that dies takes the appliance down (as ``vllm serve --api-server-count`` does):
its engine clients cannot be re-made for engines already running, and a front end silently
short of a worker is worse than a restart the operator sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from appliance.settings import Settings
from appliance.supervisor.lending_board import LendingBoard
from appliance.workers.control import ControlServer
from appliance.workers.owner import OwnerService

log = logging.getLogger("appliance")


@dataclass(frozen=True)
class WorkerStart:
    """What a worker process reads from its stdin at start."""

    settings: Settings
    index: int
    listen_fd: int
    control_path: Path
    owner_path: Path
    board_path: Path
    token: str


class WorkerPool:
    """K-1 worker processes beside the owner, sharing its listening socket."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        listener: socket.socket,
        runtime_dir: Path | None = None,
    ) -> None:
        """``runtime_dir``: a directory only this user may enter (the appliance's, see
        ``appliance.runtime_dir``), where the owner's private sockets go; None: a new one."""
        self.settings = settings
        self.count = count
        self.listener = listener
        self.token = secrets.token_urlsafe(32)
        self.runtime_dir = runtime_dir or Path(tempfile.mkdtemp(prefix="appliance-"))
        self.control_path = self.runtime_dir / "control.sock"
        self.owner_path = self.runtime_dir / "owner.sock"
        # The counters every HTTP process admits requests by, without asking the owner.
        self.board_path = self.runtime_dir / "board"
        self.board = LendingBoard.create(self.board_path, settings.auth.rate_windows())
        # Captured now: later, an engine's spawn window may have its own variables in force.
        self._environ = dict(os.environ)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self.worker_died = False
        self._on_death: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)

    def serve(self, config: uvicorn.Config) -> bool:
        """Run the owner's HTTP server on the shared port and on its private socket for the
        workers, until a shutdown signal (passed on to the workers as it comes); False if
        it never started, or stopped because a worker died."""
        server = _ForwardingServer(config, self)
        server.run(sockets=[self.listener, self.owner_socket()])
        return server.started and not self.worker_died

    def owner_socket(self) -> socket.socket:
        """The Unix socket the owner's HTTP server also listens on, for the workers."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.owner_path))
        self.owner_path.chmod(0o600)
        return sock

    @contextlib.asynccontextmanager
    async def running(self, app: FastAPI) -> AsyncIterator[None]:
        """The owner's lifespan part: the control channel up, the workers started; at the
        end, the workers stopped (they finish their requests) before the engines are."""
        service = OwnerService(
            router=app.state.appliance.router,
            access=app.state.model_access,
            auth=self.settings.auth,
            key_limits=app.state.key_limits,
            metrics=app.state.appliance.metrics,
            observers=[app.state.appliance.metrics, app.state.appliance.usage],
            engine_metrics=app.state.appliance.engine_metrics,
        )
        control = ControlServer(self.control_path, self.token, service.handlers())
        await control.start()
        # Before /metrics or /admin/usage are read, workers hand over what they counted.
        app.state.settle_workers = lambda: control.ask_all("flush", timeout=3.0)
        self._spawn()
        watcher = asyncio.create_task(self._watch())
        announcer = asyncio.create_task(self._announce(service, control))
        try:
            yield
        finally:
            self._stopping = True
            watcher.cancel()
            announcer.cancel()
            await asyncio.to_thread(self.stop, self.settings.shutdown_grace_seconds + 5)
            await control.stop()
            with contextlib.suppress(OSError):
                self.owner_path.unlink()
                self.board_path.unlink()
                self.runtime_dir.rmdir()

    def _spawn(self) -> None:
        fd = self.listener.fileno()
        for index in range(1, self.count):
            process = subprocess.Popen(
                [sys.executable, "-m", "appliance.workers.worker"],
                stdin=subprocess.PIPE,
                pass_fds=(fd,),
                env=self._environ,
            )
            start = WorkerStart(
                # The count resolved: a worker's share of each model's places is 1 / count.
                settings=self.settings.model_copy(update={"workers": self.count}),
                index=index,
                listen_fd=fd,
                control_path=self.control_path,
                owner_path=self.owner_path,
                board_path=self.board_path,
                token=self.token,
            )
            assert process.stdin is not None
            # Settings hold the API keys: they go through a pipe, never argv or environment.
            process.stdin.write(pickle.dumps(start))
            process.stdin.close()
            self._processes.append(process)
            log.info("http worker started", extra={"worker": index, "pid": process.pid})

    def pids(self) -> list[int]:
        """The worker processes' ids."""
        return [p.pid for p in self._processes]

    def forward(self, sig: int) -> None:
        """Pass a shutdown signal on: each worker stops accepting and finishes its requests."""
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def stop(self, timeout: float) -> None:
        """Stop every worker: SIGTERM, ``timeout`` seconds to finish, then SIGKILL."""
        self._stopping = True
        self.forward(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("http worker did not stop in time: killed", extra={"pid": process.pid})
                process.kill()
                process.wait()

    async def _announce(self, service: OwnerService, control: ControlServer) -> None:
        """Tell the workers of every engine they can attach to, whenever that set changes
        (or a worker connects), so they attach before their first request for it."""
        told: tuple[frozenset[str], tuple[int, ...]] | None = None
        while True:
            links = service.links()
            now = (frozenset(link["link_id"] for link in links), tuple(control.workers()))
            if now != told and now[1]:
                await control.ask_all("attach", timeout=5.0, links=links)
                told = now
            await asyncio.sleep(0.5)

    async def _watch(self) -> None:
        """Take the appliance down if a worker dies while it is serving."""
        while not self._stopping:
            for process in self._processes:
                code = process.poll()
                if code is not None and not self._stopping:
                    log.error(
                        "http worker died: stopping the appliance",
                        extra={"event": "worker_died", "pid": process.pid, "code": code},
                    )
                    self._stopping = True
                    self.worker_died = True
                    self._on_death()
                    return
            await asyncio.sleep(0.5)


class _ForwardingServer(uvicorn.Server):
    """Uvicorn's server, passing a shutdown signal on to the workers the moment it comes, so
    all stop accepting together and finish their requests while the engines are still up."""

    def __init__(self, config: uvicorn.Config, pool: WorkerPool) -> None:
        super().__init__(config)
        self._pool = pool

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Tell the workers to stop, then shut down as uvicorn does."""
        # SIGTERM whatever came: after a Ctrl-C the workers got their own SIGINT from the
        # terminal, and a second SIGINT would make uvicorn drop their requests unfinished.
        self._pool.forward(signal.SIGTERM)
        super().handle_exit(sig, frame)
