"""The one set of test fakes for the narrow engine interface (``appliance.engines.base``).

For unit tests of pure logic only (supervisor, metrics, the HTTP layer through the app
factory); integration tests run real vLLM. ``FakeEngine`` is what every engine does; the
optional capabilities are mixed in as the real engines have them: ``SleepingEngine`` (sleep
mode, weights size), ``AdapterEngine`` (runtime LoRA adapters). ``EchoEngine`` answers
requests with the model it was asked for; ``FakeBackend`` is a remote backend's proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from appliance.catalogue.schema import ModelSpec
from appliance.engines.base import EngineStats, JSONReply, Reply, RouteCall, StreamReply
from appliance.host.inventory import Inventory
from appliance.host.placement import Allocation


def body_of(call: RouteCall) -> dict[str, Any]:
    """The JSON body of ``call``: parsed already (the OpenAI routes), or its bytes."""
    if call.parsed is not None:
        return call.parsed
    return json.loads(call.body) if call.body else {}


class FakeEngine:
    """The narrow interface, and nothing else: starts after ``start_delay`` (or fails to),
    can be made to die, answers ``{}``; ``snapshot`` None makes ``stats`` raise (a dying
    engine). ``calls`` keeps every call it served."""

    def __init__(
        self,
        name: str = "fake",
        start_delay: float = 0.0,
        fail: bool = False,
        *,
        snapshot: EngineStats | None = EngineStats(),
        alive: bool = False,
    ) -> None:
        self.name = name
        self.start_delay = start_delay
        self.fail = fail
        self.snapshot = snapshot
        self.alive = alive
        self.stopped = 0
        self.calls: list[RouteCall] = []

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.alive = True

    async def stop(self) -> None:
        self.alive = False
        self.stopped += 1

    async def serve(self, call: RouteCall, request: Any) -> Reply:
        self.calls.append(call)
        return await self.answer(call, body_of(call))

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        """What ``serve`` answers; subclasses shape it."""
        return JSONReply(200, b"{}")

    def routes(self) -> frozenset[str] | None:
        return None  # unknown: like a remote backend, it answers for itself

    def is_alive(self) -> bool:
        return self.alive

    def stats(self) -> EngineStats:
        if self.snapshot is None:
            raise RuntimeError("engine is dying")
        return self.snapshot


class SleepingEngine(FakeEngine):
    """A local engine's sleep mode and weights: ``sleeping`` is the level it sleeps at."""

    weights: float | None = 1.0  # what the weight files measure (None: not found, offline)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sleeping = 0

    async def sleep(self, level: int) -> None:
        self.sleeping = level

    async def wake_up(self) -> None:
        self.sleeping = 0

    def weights_gib(self) -> float | None:
        return self.weights

    def model_card(self) -> dict[str, Any] | None:
        return None


class AdapterEngine(SleepingEngine):
    """A local engine that also keeps the LoRA adapters it was told to serve."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: dict[str, str] = {}

    async def load_adapter(self, name: str, source: str) -> None:
        self.served[name] = source

    async def unload_adapter(self, name: str) -> None:
        del self.served[name]

    def adapters(self) -> dict[str, str]:
        return dict(self.served)


class EchoEngine(AdapterEngine):
    """Answers with the model it was asked for; streams three events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = None

    async def answer(self, call: RouteCall, body: dict[str, Any]) -> Reply:
        model = body["model"]
        if not body.get("stream"):
            return JSONReply(200, json.dumps({"model": model, "object": "x"}).encode())

        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0)
                yield f'data: {{"model": "{model}", "n": {i}}}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return StreamReply(events())


class FakeBackend(FakeEngine):
    """A remote backend's proxy whose health the test decides (it is up unless told)."""

    def __init__(self, name: str = "remote") -> None:
        super().__init__(name, alive=True)


class FakeMaker:
    """Makes ``engine_type`` engines (``SleepingEngine`` by default); remembers them.
    ``failing``: names whose engine fails to start."""

    def __init__(
        self, start_delay: float = 0.05, engine_type: type[FakeEngine] = SleepingEngine
    ) -> None:
        self.start_delay = start_delay
        self.engine_type = engine_type
        self.failing: set[str] = set()
        self.made: list[Any] = []

    def validate(self, spec: ModelSpec) -> None:
        pass

    def create(self, spec: ModelSpec, allocation: Allocation, inventory: Inventory) -> Any:
        engine = self.engine_type(spec.name, self.start_delay, spec.name in self.failing)
        self.made.append(engine)
        return engine

    def adapter_source(self, model: str, name: str, source: str) -> str:
        return source


class OneEngineMaker:
    """Hands out the one ``engine`` it was given, for every entry (a test that watches it)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def validate(self, spec: ModelSpec) -> None:
        pass

    def create(self, spec: ModelSpec, allocation: Allocation, inventory: Inventory) -> Any:
        return self.engine

    def adapter_source(self, model: str, name: str, source: str) -> str:
        return source
