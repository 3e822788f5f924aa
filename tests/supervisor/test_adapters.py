"""LoRA adapters in the supervisor's table, with fake engines: names, loads at run time
without touching requests in flight, unloads, and what a restart brings back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.catalogue.schema import ModelSpec, parse_model_spec
from appliance.errors import LifecycleError, ModelNotFoundError
from appliance.host.inventory import cpu_inventory
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.supervisor import Supervisor, Target
from tests.fakes import AdapterEngine, FakeMaker
from tests.supervisor.test_supervisor import Recorder


class LoraMaker(FakeMaker):
    def __init__(self, start_delay: float = 0.05) -> None:
        super().__init__(start_delay, AdapterEngine)

    def adapter_source(self, model: str, name: str, source: str) -> str:
        return f"/resolved/{source}"


def base(**extra: Any) -> ModelSpec:
    return parse_model_spec(
        {
            "name": "base",
            "source": "org/base",
            "aliases": ["b"],
            "adapters": [{"name": "sql", "source": "org/sql-lora"}],
            **extra,
        }
    )


def run(body: Any) -> None:
    async def main() -> None:
        maker = LoraMaker(0.01)
        limits = SupervisorLimits(watch_interval_seconds=0.02, restart_backoff_seconds=0.01)
        sup = Supervisor(cpu_inventory(8), maker, limits=limits, observer=Recorder())
        try:
            await body(sup, maker)
        finally:
            await sup.shutdown()

    asyncio.run(main())


def test_a_declared_adapter_is_a_name_served_by_its_model_under_its_own_name() -> None:
    async def body(sup: Supervisor, maker: LoraMaker) -> None:
        await sup.start([base()])
        assert sup.target_of("sql") == Target("base", "sql", ("sql",))
        assert sup.target_of("b") == Target("base", "base", ("base", "b"))
        assert sup.resolve("sql") == "base" and sup.adapter_names() == ["sql"]
        assert sup.describe("base")["adapters"] == [{"name": "sql", "source": "org/sql-lora"}]

    run(body)


def test_an_adapter_loads_at_run_time_while_a_request_is_in_flight() -> None:
    async def body(sup: Supervisor, maker: LoraMaker) -> None:
        await sup.start([base()])
        await sup.load("base")
        async with sup.acquire("base") as engine:
            await sup.load_adapter("base", "chat-lora", "./loras/chat")
            assert sup.get("base").in_flight == 1  # the request goes on
            assert engine.adapters() == {"chat-lora": "/resolved/./loras/chat"}  # type: ignore[attr-defined]
        assert sup.target_of("chat-lora") == Target("base", "chat-lora", ("chat-lora",))
        await sup.unload_adapter("base", "chat-lora")
        assert sup.target_of("chat-lora") is None
        with pytest.raises(ModelNotFoundError):
            await sup.unload_adapter("base", "chat-lora")

    run(body)


def test_adapter_names_may_not_take_another_name_and_need_a_ready_model() -> None:
    async def body(sup: Supervisor, maker: LoraMaker) -> None:
        await sup.start([base(autoload=False)])
        with pytest.raises(LifecycleError, match="ready"):
            await sup.load_adapter("base", "new", "org/new")
        await sup.load("base")
        for taken in ("base", "b"):
            with pytest.raises(LifecycleError, match="already"):
                await sup.load_adapter("base", taken, "org/x")

    run(body)


def test_adapters_loaded_at_run_time_come_back_after_a_restart() -> None:
    async def body(sup: Supervisor, maker: LoraMaker) -> None:
        await sup.start([base()])
        await sup.load("base")
        await sup.load_adapter("base", "chat-lora", "org/chat")
        first = maker.made[-1]
        first.alive = False  # the engine dies; the supervisor restarts it
        await asyncio.wait_for(_until(lambda: len(maker.made) == 2 and maker.made[-1].alive), 5)
        assert maker.made[-1].adapters() == {"chat-lora": "/resolved/org/chat"}  # type: ignore[attr-defined]
        assert sup.target_of("chat-lora") is not None

    run(body)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)
