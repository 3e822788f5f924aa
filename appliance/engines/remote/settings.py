"""How the appliance talks to its remote backends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemoteSettings:
    """How the appliance talks to its remote backends."""

    connect_timeout: float = 1.0  # a reachable LAN peer accepts in milliseconds
    read_timeout: float = 60.0  # longest silence between two bytes of a stream
    total_timeout: float = 600.0  # a whole non-streamed answer (long generations are slow)
    write_timeout: float = 10.0
    pool_timeout: float = 5.0  # waiting for a free pooled connection
    max_connections: int = 256
    connect_retries: int = 2  # extra tries after a connect error, and only then
    retry_backoff: float = 0.05  # seconds before the first retry; doubles each time
    failure_threshold: int = 5  # consecutive failures that open the breaker
    cool_down: float = 10.0  # seconds the breaker stays open before one probe may pass
    health_interval: float | None = 5.0  # background health check period; None: no check
    health_timeout: float = 2.0
    api_key_env: str | None = None  # env var holding the Bearer key sent to every backend
    api_key_envs: Mapping[str, str] = field(default_factory=dict)  # per model name, overrides
    max_reply_bytes: int = 256 * 2**20  # a non-streamed answer larger than this is refused


DETAIL_SCOPE = "appliance.backend_detail"
"""ASGI scope key: False when the caller may not see backend URLs and upstream error text
(a user key); the route sets it. Absent: shown (the caller is the operator's own code)."""
