"""vLLM's ``AsyncLLM`` client of one engine, built alike by an owner and an attached client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.engines.vllm.stats import StatsRecorder, unexposed_prometheus_logger


@dataclass(frozen=True)
class ClientSeat:
    """Which client of engine cores shared by ``count`` clients this is, and their addresses."""

    index: int
    count: int
    inputs: Sequence[str]
    outputs: Sequence[str]
    stats_update_address: str | None

    def addresses(self) -> dict[str, Any]:
        """AsyncLLM's ``client_addresses`` for this client (what APIServerProcessManager in
        v1/utils.py hands each API process, less the listeners it pre-binds)."""
        addresses: dict[str, Any] = {
            "input_address": self.inputs[self.index],
            "output_address": self.outputs[self.index],
        }
        if self.stats_update_address is not None:
            addresses["stats_update_address"] = self.stats_update_address
        return addresses


def new_client(vllm_config: Any, stats: StatsRecorder, seat: ClientSeat | None = None) -> Any:
    """vLLM's ``AsyncLLM`` for ``vllm_config``, its statistics recorded into ``stats``.

    Without a ``seat`` vLLM launches the engine cores for this one client and returns once they
    are ready. With one it connects to cores already started for several clients, as client
    ``seat.index``: the owner's 0, or an attached process's.
    """
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    shared: dict[str, Any] = {}
    if seat is not None:
        # The cores have their own copy of the config (spawn pickled it); in this one a
        # client's rank is its index (as entry.py build_async_engine_client sets it).
        vllm_config.parallel_config._api_process_rank = seat.index
        shared = {
            "client_addresses": seat.addresses(),
            "client_count": seat.count,
            "client_index": seat.index,
        }
    return AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[stats.factory(), unexposed_prometheus_logger()],
        enable_log_requests=False,
        disable_log_stats=False,
        **shared,
    )
