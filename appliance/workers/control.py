"""The control channel between the process that owns the model table and its HTTP workers.

One Unix socket, in a directory only this user can enter; each worker keeps one connection
open for its whole life. Messages are JSON lines: a call ``{"id", "op", "args"}`` is answered
by ``{"id", "ok": {...}}`` or ``{"id", "error": {...}}``. A worker proves it was started by
the owner with a token it got at spawn; the owner drops a connection that does not.

The channel carries only what must be shared to be exact (key slots, admissions, releases,
figures for the metrics); requests and their tokens never cross it: a worker talks to the
engine cores itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("appliance")

MAX_LINE_BYTES = 1 << 20  # a release's figures are a few kB; anything past this is a fault


INTERNAL_FAILURE = "internal error (logged by the process that answered)"
"""What a call answers when its handler failed unexpectedly: no exception type or text."""


class ControlError(Exception):
    """The other side refused a call, or the channel is gone."""

    def __init__(self, message: str, detail: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = dict(detail or {})


@dataclass(eq=False)  # one per connection: compared (and hashed) by identity
class WorkerSession:
    """One connected worker, as the owner sees it: what it holds, freed if it goes."""

    index: int
    held: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    writer: asyncio.StreamWriter | None = None
    asked: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    def hold(self, token: str, release: Callable[[], Awaitable[None]]) -> None:
        """Remember ``release`` under ``token`` until the worker gives it back (or dies)."""
        self.held[token] = release

    def give_back(self, token: str) -> Callable[[], Awaitable[None]] | None:
        """The release held under ``token``, forgotten; None if unknown (given back before)."""
        return self.held.pop(token, None)


Handler = Callable[[WorkerSession, dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """The owner's end: answers each worker's calls with ``handlers[op]``."""

    def __init__(self, path: Path, token: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self._token = token
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[WorkerSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Listen on the socket (mode 0600: only this user's processes may connect)."""
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE_BYTES
        )
        self.path.chmod(0o600)

    async def stop(self) -> None:
        """Stop listening, close every connection and release what the workers held."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def workers(self) -> list[int]:
        """The indexes of the workers connected now."""
        return sorted(session.index for session in self._sessions)

    async def ask_all(self, op: str, *, timeout: float, **args: Any) -> None:
        """Call ``op`` with ``args`` on every connected worker and wait (at most ``timeout``
        seconds) for all of them to answer; a worker that does not is left to it."""
        waits = []
        for session in list(self._sessions):
            if session.writer is None:
                continue
            call_id = f"owner-{next(self._ids)}"
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            session.asked[call_id] = future
            with contextlib.suppress(ConnectionError):
                await _write(session.writer, {"id": call_id, "op": op, "args": args})
                waits.append(future)
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session: WorkerSession | None = None
        try:
            hello = await _read(reader)
            if (
                hello is None
                or hello.get("op") != "hello"
                or not isinstance(hello.get("token"), str)
                or not hmac.compare_digest(hello["token"], self._token)
                or not isinstance(hello.get("index"), int)
            ):
                return
            session = WorkerSession(index=hello["index"], writer=writer)
            self._sessions.add(session)
            self.connected.set()
            await _write(writer, {"id": hello.get("id"), "ok": {}})
            calls: set[asyncio.Task[None]] = set()
            try:
                while (message := await _read(reader)) is not None:
                    if "op" not in message:  # the answer to a call of ours
                        asked = session.asked.pop(str(message.get("id")), None)
                        if asked is not None and not asked.done():
                            asked.set_result(message)
                        continue
                    call = asyncio.create_task(self._answer(session, message, writer))
                    calls.add(call)
                    call.add_done_callback(calls.discard)
            finally:
                for call in list(calls):
                    call.cancel()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if session is not None:
                self._sessions.discard(session)
                for asked in session.asked.values():
                    if not asked.done():
                        asked.set_result({"error": {"message": "the worker is gone"}})
                await self._release_all(session)
            writer.close()
            self._tasks.discard(task)

    async def _answer(
        self, session: WorkerSession, message: dict[str, Any], writer: asyncio.StreamWriter
    ) -> None:
        handler = self._handlers.get(str(message.get("op")))
        args = message.get("args")
        reply: dict[str, Any] = {"id": message.get("id")}
        if handler is None or not isinstance(args, dict):
            reply["error"] = {"message": f"unknown call {message.get('op')!r}"}
        else:
            try:
                reply["ok"] = await handler(session, args)
            except ControlError as exc:
                reply["error"] = {"message": str(exc), **exc.detail}
            except Exception:  # a bug here must not take the worker's request down
                log.exception("control call %s failed", message.get("op"))
                # What failed is in this log line; the reply may reach a client.
                reply["error"] = {"message": INTERNAL_FAILURE}
        with contextlib.suppress(ConnectionError):
            await _write(writer, reply)

    @staticmethod
    async def _release_all(session: WorkerSession) -> None:
        """A worker that went away holds nothing any more (its requests died with it)."""
        for token in list(session.held):
            release = session.give_back(token)
            if release is not None:
                with contextlib.suppress(Exception):
                    await release()


class ControlClient:
    """A worker's end: one connection to the owner, calls multiplexed over it."""

    def __init__(
        self,
        path: Path,
        token: str,
        index: int,
        handlers: Mapping[str, Callable[[dict[str, Any]], Awaitable[None]]] | None = None,
    ) -> None:
        """``handlers``: what the owner may ask of this worker (``flush``...)."""
        self._handlers = dict(handlers or {})
        self._path = path
        self._token = token
        self.index = index
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._asked: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    async def connect(self) -> None:
        """Connect and introduce this worker; raise ``ControlError`` if refused."""
        reader, self._writer = await asyncio.open_unix_connection(
            str(self._path), limit=MAX_LINE_BYTES
        )
        self._reader_task = asyncio.create_task(self._read_replies(reader))
        await self.call("hello", token=self._token, index=self.index)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail."""
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        self._fail_pending()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Call ``op`` on the owner; its answer, or ``ControlError`` with its reason."""
        if self._writer is None or self.closed.is_set():
            raise ControlError("the owner process is gone")
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        message: dict[str, Any] = {"id": call_id, "op": op, "args": args}
        if op == "hello":
            message = {"id": call_id, "op": op, **args}
        try:
            async with self._lock:
                await _write(self._writer, message)
        except ConnectionError as exc:
            self._pending.pop(call_id, None)
            raise ControlError("the owner process is gone") from exc
        reply = await future
        if "error" in reply:
            error = dict(reply["error"])
            raise ControlError(str(error.pop("message", "refused")), error)
        return dict(reply.get("ok") or {})

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while (reply := await _read(reader)) is not None:
                if "op" in reply:  # the owner asks something of us
                    task = asyncio.create_task(self._answer(reply))
                    self._asked.add(task)
                    task.add_done_callback(self._asked.discard)
                    continue
                future = self._pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.closed.set()
            self._fail_pending()

    async def _answer(self, message: dict[str, Any]) -> None:
        handler = self._handlers.get(str(message.get("op")))
        reply: dict[str, Any] = {"id": message.get("id")}
        if handler is None:
            reply["error"] = {"message": f"unknown call {message.get('op')!r}"}
        else:
            try:
                args = message.get("args")
                await handler(args if isinstance(args, dict) else {})
                reply["ok"] = {}
            except Exception:
                log.exception("control call %s from the owner failed", message.get("op"))
                reply["error"] = {"message": INTERNAL_FAILURE}
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                async with self._lock:
                    await _write(self._writer, reply)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result({"error": {"message": "the owner process is gone"}})


async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    line = await reader.readline()
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a control message must be a JSON object")
    return message


async def _write(writer: asyncio.StreamWriter, message: Mapping[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()
