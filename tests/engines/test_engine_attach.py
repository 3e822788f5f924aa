"""One engine, several client processes: what `vllm serve --api-server-count N` does.

The owner starts the engine cores for three clients and is client 0; other processes, started
with multiprocessing's spawn as the appliance's workers will be, attach as clients 1 and 2 and
talk to the cores themselves. One real tiny engine serves the whole module (one start); the first
tests need none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import multiprocessing
import os
import threading
import traceback
from collections.abc import Coroutine, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from starlette.requests import Request
from vllm.v1.metrics.stats import SchedulerStats

from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.base import (
    Endpoint,
    EngineLink,
    EngineStats,
    JSONReply,
    RouteCall,
    SchedulerSnapshot,
    StreamReply,
)
from appliance.engines.factory import EngineFactory
from appliance.engines.vllm import VLLMEngine, attach_engine
from appliance.engines.vllm.lora import (
    SHARED_LORA_IDS,
    PinnableCounter,
    pinned_lora_id,
    shared_lora_id,
)
from appliance.host.inventory import cpu_inventory
from appliance.host.placement import Allocation
from tests.integration.harness import wait_until

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / ".models" / "tiny-llama"
START_SECONDS = 420.0  # an engine start takes 30-60 s on 2 cores; the child imports vLLM too
REPLY_SECONDS = 120.0
T = TypeVar("T")


def tiny_spec() -> LocalModelSpec:
    """The tiny Llama of scripts/build_tiny_model.py, as models.yaml would declare it."""
    return LocalModelSpec(
        name="tiny-chat",
        source=str(TINY),
        task="generate",
        engine={"max_model_len": 512, "dtype": "float32"},
    )


def lora_spec() -> LocalModelSpec:
    """The tiny Llama with vLLM's LoRA support on, so adapters can be loaded at run time."""
    spec = tiny_spec()
    return spec.model_copy(
        update={"engine": {**spec.engine, "enable_lora": True, "max_lora_rank": 8, "max_loras": 2}}
    )


def build_adapter(out: Path, seed: int) -> Path:
    """A tiny random LoRA adapter for the tiny Llama (scripts/build_tiny_lora.py), per seed."""
    module_spec = importlib.util.spec_from_file_location(
        "build_tiny_lora", REPO / "scripts" / "build_tiny_lora.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return Path(module.build_lora(TINY, out, seed=seed))


def incoming() -> Request:
    """The client's request as a route would pass it."""
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []})


async def answer(engine: Any, body: dict[str, Any]) -> dict[str, Any] | list[str]:
    """A completion's JSON body, or a stream's events (``data: ...`` lines)."""
    reply = await engine.serve(RouteCall.of_endpoint(Endpoint.COMPLETIONS, body), incoming())
    if isinstance(reply, StreamReply):
        return [chunk.decode() async for chunk in reply.chunks]
    assert isinstance(reply, JSONReply)
    assert reply.status_code == 200, reply.body
    result = json.loads(reply.body)
    assert isinstance(result, dict)
    return result


def completion(max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    """A temperature-0 completion whose tokens are returned too."""
    return {
        "model": "tiny-chat",
        "prompt": "The appliance answers",
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def streamed_text(events: list[str]) -> str:
    """The text of a completion stream, and a check that it ended as vLLM ends one."""
    payloads = [
        line.removeprefix("data: ")
        for event in events
        for line in event.splitlines()
        if line.startswith("data: ")
    ]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return "".join(
        json.loads(p)["choices"][0]["text"] for p in payloads[:-1] if json.loads(p)["choices"]
    )


# -- without an engine -------------------------------------------------------------------------


def test_one_client_gives_no_link() -> None:
    spec = tiny_spec()
    engine = VLLMEngine(spec, argparse.Namespace(model=str(TINY)))
    assert engine.link() is None
    with pytest.raises(ValueError, match="at least 1"):
        VLLMEngine(spec, argparse.Namespace(model=str(TINY)), clients=0)


def test_with_several_clients_a_client_reports_only_its_own_requests() -> None:
    class Client:
        def get_num_unfinished_requests(self) -> int:
            return 3

    engine = VLLMEngine(tiny_spec(), argparse.Namespace(model=str(TINY)), clients=2)
    engine._engine = Client()
    # Another client's step may have been the last to bring SchedulerStats: not reported as
    # the gauges, only as the snapshot with its time (the owner shows the freshest client's).
    engine._stats.record(SchedulerStats(num_running_reqs=5, num_waiting_reqs=2), None)
    at = engine._stats.snapshot.at if engine._stats.snapshot else -1.0
    snapshot = SchedulerSnapshot(waiting=2, kv_cache_usage=0.0, at=at)
    assert engine.stats() == EngineStats(
        running=3, waiting=0, kv_cache_usage=None, scheduler=snapshot
    )
    one = VLLMEngine(tiny_spec(), argparse.Namespace(model=str(TINY)))
    one._engine = Client()
    one._stats.record(SchedulerStats(num_running_reqs=5, num_waiting_reqs=2), None)
    at = one._stats.snapshot.at if one._stats.snapshot else -1.0
    assert one.stats() == EngineStats(
        running=3, waiting=2, kv_cache_usage=0.0, scheduler=SchedulerSnapshot(2, 0.0, at)
    )
    assert EngineFactory.link_of(one) is None


def test_attaching_takes_only_the_other_clients_indices() -> None:
    link = EngineLink("m", 2, ("ipc:///x/in0", "ipc:///x/in1"), ("ipc:///x/o0", "ipc:///x/o1"), b"")
    for index in (0, 2, -1):
        with pytest.raises(ValueError, match="0 is the owner's"):
            attach_engine(link, index)


def test_adapters_loaded_at_run_time_get_one_id_in_every_client() -> None:
    first = shared_lora_id("sql", "/adapters/sql")
    assert first == shared_lora_id("sql", "/adapters/sql")  # another process derives it alike
    assert SHARED_LORA_IDS <= first < 2 * SHARED_LORA_IDS  # above the counter's, an int32
    assert shared_lora_id("sql", "/adapters/sql-v2") != first  # new weights, a new id

    class Counter:
        def __init__(self) -> None:
            self.value = 0

        def inc(self, num: int = 1) -> int:
            self.value += num
            return self.value

    counter = PinnableCounter(Counter())
    assert counter.inc() == 1  # models.yaml's adapters, at start, as vLLM numbers them
    with pinned_lora_id(first):
        assert counter.inc() == first
    assert counter.inc() == 2


# -- one engine, two clients -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the owner's client lives on the loop it started on."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="owner-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on the module's loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@pytest.fixture(scope="module")
def owner(loop: asyncio.AbstractEventLoop) -> Iterator[VLLMEngine]:
    """The tiny engine, its cores started for three clients; this process is client 0."""
    if not (TINY / "config.json").exists():
        pytest.skip("build the tiny models first: python scripts/build_tiny_model.py --all")
    factory = EngineFactory(base_dir=REPO)
    engine = factory.create(
        lora_spec(), Allocation("tiny-chat", (0,), 1.0, (1.0,)), cpu_inventory(4), clients=3
    )
    assert isinstance(engine, VLLMEngine)
    run(loop, engine.start(), START_SECONDS)
    yield engine
    run(loop, engine.stop(), REPLY_SECONDS)


class OtherClient:
    """Client ``index`` in a spawned process (as a worker process will be), driven by a pipe."""

    def __init__(self, link: EngineLink, index: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.index = index
        self.conn, child = context.Pipe()
        self.proc = context.Process(
            target=other_client, args=(link, index, child), name=f"client-{index}"
        )
        self.proc.start()
        child.close()

    def receive(self, timeout: float = REPLY_SECONDS) -> Any:
        """The child's next message; fails if it died or said it failed."""
        if not self.conn.poll(timeout):
            raise TimeoutError(
                f"client {self.index} said nothing in {timeout}s (exit {self.proc.exitcode})"
            )
        message = self.conn.recv()
        if message[0] == "error":
            raise AssertionError(f"client {self.index} failed:\n{message[1]}")
        return message

    def call(self, command: str, body: dict[str, Any] | None = None) -> Any:
        """Send ``command`` and return what the child answers."""
        self.conn.send((command, body))
        return self.receive()[1]

    def ask(self, body: dict[str, Any]) -> Any:
        """The child's answer to ``body``: its JSON body or its stream's events."""
        return self.call("complete", body)

    def close(self) -> None:
        """Stop the child (if it still runs) and reap it."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop", None))
            self.proc.join(REPLY_SECONDS)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def other_client(link: EngineLink, index: int, conn: Connection) -> None:
    """The spawned process's body: attach as client ``index``, then answer the test."""
    try:
        asyncio.run(serve_commands(link, index, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


async def serve_commands(link: EngineLink, index: int, conn: Connection) -> None:
    """Attach through the factory, as a worker process would, and serve until told to stop."""
    engine = EngineFactory(base_dir=REPO).attach(link, index)
    try:
        await engine.start()
        conn.send(("ready", engine.model_card(), sorted(engine.routes() or ())))
        while True:
            command, body = await asyncio.to_thread(conn.recv)
            if command == "stop":
                await engine.stop()
                conn.send(("stopped", engine.is_alive()))
                return
            if command == "alive":
                conn.send(("alive", engine.is_alive()))
                continue
            if command == "load":
                assert body is not None
                await engine.load_adapter(body["name"], body["source"])
                conn.send(("loaded", None))
                continue
            try:
                conn.send(("answer", await answer(engine, body)))
            except Exception as exc:  # what a route would turn into an error reply
                conn.send(("raised", type(exc).__name__))
    finally:
        await engine.stop()


def card(model_card: dict[str, Any] | None) -> dict[str, Any]:
    """A model card less what differs each time one is made."""
    assert model_card is not None
    return {k: v for k, v in model_card.items() if k not in ("created", "permission")}


def attached(owner: VLLMEngine, index: int) -> Iterator[OtherClient]:
    """Client ``index``, attached from another process; stopped at the end if not before."""
    link = owner.link()
    assert link is not None
    client = OtherClient(link, index)
    try:
        ready = client.receive(START_SECONDS)
        assert ready[0] == "ready"
        # The same serving layer, built alike (the card's time stamp and ids are its own).
        assert card(ready[1]) == card(owner.model_card())
        assert ready[2] == sorted(owner.routes())
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def second(owner: VLLMEngine) -> Iterator[OtherClient]:
    """Client 1, attached from another process."""
    yield from attached(owner, 1)


@pytest.fixture(scope="module")
def third(owner: VLLMEngine) -> Iterator[OtherClient]:
    """Client 2, attached from another process (it stays attached while the owner stops)."""
    yield from attached(owner, 2)


@pytest.mark.integration
def test_the_link_names_a_pair_of_addresses_per_client(owner: VLLMEngine) -> None:
    link = owner.link()
    assert link is not None
    assert (link.model, link.client_count) == ("tiny-chat", 3)
    assert len(set(link.inputs + link.outputs)) == 6
    assert all(a.startswith("ipc://") for a in link.inputs + link.outputs)
    assert owner.is_alive()


@pytest.mark.integration
def test_both_clients_give_the_same_answer(
    loop: asyncio.AbstractEventLoop, owner: VLLMEngine, second: OtherClient
) -> None:
    mine = run(loop, answer(owner, completion()), REPLY_SECONDS)
    theirs = second.ask(completion())
    assert isinstance(mine, dict) and isinstance(theirs, dict)
    assert theirs["choices"][0]["text"] == mine["choices"][0]["text"]
    assert theirs["choices"][0]["token_ids"] == mine["choices"][0]["token_ids"]
    assert len(mine["choices"][0]["token_ids"]) == mine["usage"]["completion_tokens"] > 0


@pytest.mark.integration
def test_each_client_gets_its_own_outputs_while_both_generate(
    loop: asyncio.AbstractEventLoop, owner: VLLMEngine, second: OtherClient
) -> None:
    # Client 1's longer request runs in the cores while client 0 asks twice. A client drops
    # outputs of requests it does not know, so outputs sent to the wrong client would leave
    # the other waiting (a timeout here) or cut its answer short.
    second.conn.send(("complete", completion(max_tokens=64, ignore_eos=True)))  # not awaited
    short = run(loop, answer(owner, completion(max_tokens=12, ignore_eos=True)), REPLY_SECONDS)
    again = run(loop, answer(owner, completion(max_tokens=24, ignore_eos=True)), REPLY_SECONDS)
    long = second.receive()[1]
    for reply, count in ((short, 12), (again, 24), (long, 64)):
        assert isinstance(reply, dict)
        assert len(reply["choices"][0]["token_ids"]) == reply["usage"]["completion_tokens"]
        assert reply["usage"]["completion_tokens"] == count
    wait_until(lambda: owner.stats().running == 0, "client 0 has nothing in flight", 10)


@pytest.mark.integration
def test_a_stream_from_the_second_client(
    loop: asyncio.AbstractEventLoop, owner: VLLMEngine, second: OtherClient
) -> None:
    events = second.ask(completion(stream=True))
    assert isinstance(events, list)
    mine = run(loop, answer(owner, completion()), REPLY_SECONDS)
    assert isinstance(mine, dict)
    assert streamed_text(events) == mine["choices"][0]["text"]


@pytest.mark.integration
def test_adapters_loaded_in_another_order_serve_the_same_weights(
    loop: asyncio.AbstractEventLoop,
    owner: VLLMEngine,
    second: OtherClient,
    tmp_path: Path,
) -> None:
    # The cores know an adapter by its id alone. vLLM's serving layer numbers adapters per
    # client, so here client 1's first adapter would take the id of client 0's first, and
    # serve its weights; derived ids keep them apart.
    first = build_adapter(tmp_path / "sql-a", seed=1)
    other = build_adapter(tmp_path / "sql-b", seed=2)
    run(loop, owner.load_adapter("sql-a", str(first)), REPLY_SECONDS)
    run(loop, owner.load_adapter("sql-b", str(other)), REPLY_SECONDS)
    second.call("load", {"name": "sql-b", "source": str(other)})

    def tokens(reply: Any) -> list[int]:
        assert isinstance(reply, dict)
        return list(reply["choices"][0]["token_ids"])

    mine_a = tokens(run(loop, answer(owner, completion(model="sql-a")), REPLY_SECONDS))
    mine_b = tokens(run(loop, answer(owner, completion(model="sql-b")), REPLY_SECONDS))
    theirs_b = tokens(second.ask(completion(model="sql-b")))
    assert mine_a != mine_b, "the two adapters must answer apart for this test to tell"
    assert theirs_b == mine_b


@pytest.mark.integration
def test_the_owner_serves_on_after_the_second_client_stops(
    loop: asyncio.AbstractEventLoop, owner: VLLMEngine, second: OtherClient
) -> None:
    assert second.call("stop") is False  # is_alive() once stopped
    second.proc.join(REPLY_SECONDS)
    assert second.proc.exitcode == 0
    assert owner.is_alive()
    mine = run(loop, answer(owner, completion()), REPLY_SECONDS)
    assert isinstance(mine, dict) and mine["choices"][0]["token_ids"]


@pytest.mark.integration
def test_stopping_the_owner_ends_the_engine_processes(
    loop: asyncio.AbstractEventLoop, owner: VLLMEngine, second: OtherClient, third: OtherClient
) -> None:
    link = owner.link()
    assert link is not None
    assert third.ask(completion())["choices"][0]["token_ids"]
    children = [
        p
        for p in psutil.Process().children(recursive=True)
        # multiprocessing's resource tracker, and the other clients' processes
        if "resource_tracker" not in " ".join(p.cmdline())
        and p.pid not in (second.proc.pid, third.proc.pid)
    ]
    assert children, "the engine cores are this process's children"
    run(loop, owner.stop(), REPLY_SECONDS)
    assert not owner.is_alive() and owner.link() is None

    def gone(proc: psutil.Process) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(p) for p in children), "every engine process exits", 30)
    for address in link.inputs + link.outputs:
        assert not os.path.exists(address.removeprefix("ipc://")), address
    # A client still attached learns that the engine is gone, and fails rather than hangs.
    wait_until(lambda: third.call("alive") is False, "client 2 sees the engine gone", 10)
    assert third.ask(completion()) == "EngineError"
    assert third.call("stop") is False
