"""The owner-worker control channel: calls, refusals, and what a dead worker gives back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.api.forwarded import NameTheWorker, TrustWorkers
from appliance.workers.control import ControlClient, ControlError, ControlServer, WorkerSession
from appliance.workers.worker_access import relayed_error

TOKEN = "t0ken-of-the-owner"


def _short_dir(tmp_path: Path) -> Path:
    # Unix socket paths must be short (108 bytes); pytest's tmp paths can be longer.
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ctl-"))


async def _with_server(tmp_path: Path, handlers: dict[str, Any]) -> tuple[ControlServer, Path]:
    path = _short_dir(tmp_path) / "control.sock"
    server = ControlServer(path, TOKEN, handlers)
    await server.start()
    return server, path


def test_calls_are_answered_and_errors_come_back_with_their_detail(tmp_path: Path) -> None:
    async def echo(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01 * args["n"])  # answers come back out of order
        return {"n": args["n"], "worker": session.index}

    async def refuse(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        raise ControlError("over its limit", {"status": 429, "retry_after": 3})

    async def main() -> None:
        server, path = await _with_server(tmp_path, {"echo": echo, "refuse": refuse})
        client = ControlClient(path, TOKEN, index=2)
        await client.connect()
        answers = await asyncio.gather(*(client.call("echo", n=n) for n in (3, 1, 2)))
        assert answers == [{"n": 3, "worker": 2}, {"n": 1, "worker": 2}, {"n": 2, "worker": 2}]
        with pytest.raises(ControlError, match="over its limit") as refused:
            await client.call("refuse")
        assert refused.value.detail == {"status": 429, "retry_after": 3}
        with pytest.raises(ControlError, match="unknown call"):
            await client.call("format_disk")
        assert server.workers() == [2]
        await client.close()
        await server.stop()

    asyncio.run(main())


def test_a_wrong_token_is_not_served(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await _with_server(tmp_path, {})
        intruder = ControlClient(path, "guessed", index=1)
        with pytest.raises(ControlError, match="gone"):
            await intruder.connect()
        assert server.workers() == []
        await server.stop()

    asyncio.run(main())


def test_the_socket_is_for_this_user_only(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await _with_server(tmp_path, {})
        assert path.stat().st_mode & 0o777 == 0o600
        await server.stop()
        assert not path.exists()

    asyncio.run(main())


def test_what_a_worker_held_is_given_back_when_it_goes_away(tmp_path: Path) -> None:
    released: list[str] = []

    async def take(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        async def release() -> None:
            released.append(args["what"])

        session.hold(args["what"], release)
        return {}

    async def give(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        release = session.give_back(args["what"])
        if release is not None:
            await release()
        return {}

    async def main() -> None:
        server, path = await _with_server(tmp_path, {"take": take, "give": give})
        client = ControlClient(path, TOKEN, index=1)
        await client.connect()
        for what in ("a", "b", "c"):
            await client.call("take", what=what)
        await client.call("give", what="b")
        await client.call("give", what="b")  # twice: released once
        assert released == ["b"]
        await client.close()  # the worker dies holding a and c
        for _ in range(200):
            if len(released) == 3:
                break
            await asyncio.sleep(0.01)
        assert sorted(released) == ["a", "b", "c"]
        await server.stop()

    asyncio.run(main())


def test_calls_fail_at_once_when_the_owner_is_gone(tmp_path: Path) -> None:
    async def slow(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    async def main() -> None:
        server, path = await _with_server(tmp_path, {"slow": slow})
        client = ControlClient(path, TOKEN, index=1)
        await client.connect()
        waiting = asyncio.create_task(client.call("slow"))
        await asyncio.sleep(0.05)
        await server.stop()
        with pytest.raises(ControlError, match="gone"):
            await asyncio.wait_for(waiting, 5)
        assert client.closed.is_set()
        with pytest.raises(ControlError, match="gone"):
            await client.call("slow")

    asyncio.run(main())


def test_the_owner_asks_every_worker_and_waits_for_their_answers(tmp_path: Path) -> None:
    heard: list[tuple[int, dict[str, Any]]] = []

    async def main() -> None:
        server, path = await _with_server(tmp_path, {})
        clients = []
        for index in (1, 2):

            async def flush(args: dict[str, Any], index: int = index) -> None:
                await asyncio.sleep(0.05)
                heard.append((index, args))

            client = ControlClient(path, TOKEN, index=index, handlers={"flush": flush})
            await client.connect()
            clients.append(client)
        await server.ask_all("flush", timeout=5, why="a scrape")
        assert sorted(heard) == [(1, {"why": "a scrape"}), (2, {"why": "a scrape"})]
        for client in clients:
            await client.close()
        await server.stop()

    asyncio.run(main())


# --- the owner's HTTP edge: who may name a client's address ---------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps(
        {"client": scope.get("client"), "headers": [k.decode() for k, _ in scope["headers"]]}
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, Any], list[Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": headers, "client": ("10.0.0.9", 5555)}
    asyncio.run(app(scope, receive, send))
    return json.loads(sent[1]["body"]), sent[0]["headers"]


def test_only_a_worker_may_say_where_a_request_came_from() -> None:
    app = TrustWorkers(_app, token=TOKEN)  # type: ignore[arg-type]
    claimed = [(b"x-appliance-peer", b"127.0.0.1:1"), (b"x-appliance-worker-token", b"nope")]
    seen, _ = _call(app, claimed)
    # A client cannot pass for loopback; the headers do not reach the app either.
    assert seen["client"] == ["10.0.0.9", 5555] and seen["headers"] == []
    worker = [(b"x-appliance-peer", b"::1:4242"), (b"x-appliance-worker-token", TOKEN.encode())]
    seen, _ = _call(app, worker)
    assert seen["client"] == ["::1", 4242] and seen["headers"] == []
    without_workers = TrustWorkers(_app, token=None)  # type: ignore[arg-type]
    seen, _ = _call(without_workers, worker)
    assert seen["client"] == ["10.0.0.9", 5555]


def test_every_answer_names_its_worker_once() -> None:
    app = NameTheWorker(_app, index=3)  # type: ignore[arg-type]
    _, headers = _call(app, [])
    assert headers.count((b"x-appliance-worker", b"3")) == 1


# --- how many workers when not told -----------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "cores", "workers"),
    [(0, 2, 1), (0, 64, 1), (1, 16, 1), (4, 8, 2), (4, 64, 4), (8, 128, 8), (8, 16, 4)],
)
def test_one_worker_per_gpu_as_far_as_the_cores_allow(gpus: int, cores: int, workers: int) -> None:
    from appliance.settings import default_http_workers

    assert default_http_workers(gpus, cores) == workers


def test_a_failure_inside_the_owner_reaches_no_client_as_its_internals(tmp_path: Path) -> None:
    async def broken(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("/srv/models/secret-path")

    async def refuse(session: WorkerSession, args: dict[str, Any]) -> dict[str, Any]:
        raise ControlError("over its limit", {"status": 429, "code": "rate_limited"})

    async def main() -> None:
        server, path = await _with_server(tmp_path, {"lease": broken, "refuse": refuse})
        client = ControlClient(path, TOKEN, index=1)
        await client.connect()
        with pytest.raises(ControlError) as failed:
            await client.call("lease")
        assert "KeyError" not in str(failed.value) and "secret" not in str(failed.value)
        error = relayed_error(failed.value)
        assert error.status_code == 503 and error.code == "owner_unavailable"
        assert "secret" not in error.message and "KeyError" not in error.message
        # What the owner refused on purpose is answered as the owner would.
        with pytest.raises(ControlError) as refused:
            await client.call("refuse")
        assert relayed_error(refused.value).status_code == 429
        await client.close()
        await server.stop()
        # And the channel gone is a 503 too, not a 500 that says so.
        with pytest.raises(ControlError) as gone:
            await client.call("lease")
        assert relayed_error(gone.value).status_code == 503

    asyncio.run(main())
