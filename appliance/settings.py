"""The appliance's settings: one object, built by the CLI, passed to the app factory."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from appliance.api_keys import AuthConfig
from appliance.batches.settings import BatchSettings
from appliance.engines.remote import RemoteSettings
from appliance.hub.gguf import default_cache_dir
from appliance.supervisor.fair_queue import FairShareSettings
from appliance.supervisor.handle import SupervisorLimits
from appliance.supervisor.load_gate import OnDemandLimits
from appliance.usage.quotas import QuotaConfig


def _default_cpu_budget_gib() -> float:
    """Half the host's memory: what CPU engines may use together when no budget is given."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8.0
    return round(total / 2**30 / 2, 1)


class FanOutLimits(BaseModel):
    """How many sequences one request may ask for: each is as much work as a request."""

    model_config = ConfigDict(extra="forbid")

    max_n: int = Field(16, ge=1, description="Largest n (and best_of) a request may ask for.")
    max_batch_items: int = Field(
        32,
        ge=1,
        description=(
            "Most conversations in one /v1/chat/completions/batch request, and most prompts "
            "in one /v1/completions request."
        ),
    )


class StructuredOutputLimits(BaseModel):
    """How big a structured-output constraint (JSON schema, regex, grammar, choice) may be;
    engines compile them in their core, where no timeout applies."""

    model_config = ConfigDict(extra="forbid")

    max_schema_bytes: int = Field(
        32 * 1024, ge=64, description="Largest schema, regex or grammar, bytes (as JSON)."
    )
    max_schema_depth: int = Field(32, ge=2, description="Deepest nesting of a JSON schema.")
    max_schema_nodes: int = Field(
        4096, ge=8, description="Most values (objects, lists, scalars) in one JSON schema."
    )
    max_regex_repeat: int = Field(
        256,
        ge=1,
        description=(
            "Largest product of nested repetition bounds in one regex or pattern "
            "((a{1,64}){1,64} is 4096); a grammar's bounds all count as nested."
        ),
    )
    max_repeat_total: int = Field(
        2048,
        ge=1,
        description="Most copies the bounded repetitions of all of a request's regexes add.",
    )
    max_choices: int = Field(256, ge=1, description="Most options of a 'choice' constraint.")


class StoredResponseLimits(BaseModel):
    """How many stored responses of the Responses API are kept, and how long (with
    ``VLLM_ENABLE_RESPONSES_API_STORE=1``); the oldest go first."""

    model_config = ConfigDict(extra="forbid")

    max_stored: int = Field(1000, ge=1, description="Stored responses kept in all.")
    max_per_key: int = Field(100, ge=1, description="Stored responses kept per API key.")
    max_age_seconds: float = Field(
        3600.0, gt=0, description="Seconds a stored response is kept after it was made."
    )


class Settings(BaseModel):
    """Everything ``appliance up`` can be told."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    config_path: Path = Field(Path("models.yaml"), description="The catalogue file.")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    cpu_memory_budget_gib: float = Field(
        default_factory=_default_cpu_budget_gib,
        gt=0,
        description="Memory CPU engines may use together (only used with no GPU).",
    )
    disk_reserve_gib: float = Field(
        2.0,
        ge=0,
        description="Disk a model pull leaves free where the hub cache is (it stops short).",
    )
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache per CPU engine, GiB.")
    shutdown_grace_seconds: float = Field(
        20.0, ge=0, description="In-flight requests get this long to finish at shutdown."
    )
    log_prompts: bool = Field(
        False, description="Put prompts (truncated) in the access log; off by default."
    )
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body accepted.")
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest wait for the next piece of a request body (slow uploads)."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections at most; beyond it new ones get 503."
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description=(
            "Names and addresses a Host header may carry ('*': any); None: the names and "
            "addresses this box answers to."
        ),
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins whose web pages may call the API (CORS)."
    )
    media_url_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description=(
            "Private networks (10.0.0.0/8, say) that media URLs in requests may point to; "
            "public addresses always may, loopback, link-local and cloud metadata never."
        ),
    )
    on_demand: OnDemandLimits = Field(default_factory=OnDemandLimits)
    registry_timeout_seconds: float = Field(
        2.0, gt=0, description="How long a registry fetch may take before it counts as down."
    )
    limits: SupervisorLimits = Field(default_factory=SupervisorLimits)
    fair_share: FairShareSettings = Field(default_factory=FairShareSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    fan_out: FanOutLimits = Field(default_factory=FanOutLimits)
    structured_outputs: StructuredOutputLimits = Field(default_factory=StructuredOutputLimits)
    stored_responses: StoredResponseLimits = Field(default_factory=StoredResponseLimits)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    usage_db: Path | None = Field(
        None, description="SQLite file of per-key usage; default: usage.db beside the catalogue."
    )
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    status_page: bool = Field(True, description="Serve the status page at / and /ui.")
    engine_metrics: bool = Field(
        False,
        description=(
            "Expose vLLM's own engine figures per model (prefix cache, preemptions, queue, "
            "prefill and decode times, speculative decoding); they cost work on every step."
        ),
    )
    list_aliases: bool = Field(
        False, description="List each model alias in GET /v1/models as a model of its own."
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "HTTP worker processes (the owner is one of them); None: one per GPU, with four "
            "cores per worker at least (``default_http_workers``)."
        ),
    )

    conversion_cache: Path | None = Field(
        None,
        description=(
            "Folder where GGUF sources are converted once into safetensors folders; None: "
            "$XDG_CACHE_HOME/appliance/converted (~/.cache/appliance/converted)."
        ),
    )

    def disk_reserve_bytes(self) -> int:
        """``disk_reserve_gib`` in bytes."""
        return int(self.disk_reserve_gib * 2**30)

    def usage_db_path(self) -> Path:
        """Where per-key usage is kept."""
        return self.usage_db or self.config_path.resolve().parent / "usage.db"

    def conversion_cache_path(self) -> Path:
        """Where GGUF sources are converted to."""
        return self.conversion_cache or default_cache_dir()


CORES_PER_HTTP_WORKER = 4
"""A worker keeps a core busy at full load, and the engines' schedulers need cores too."""


def default_http_workers(gpus: int, cores: int) -> int:
    """HTTP workers when not told: one per GPU (as ``vllm serve`` defaults its API servers to
    its data-parallel engines), as far as the cores allow; 1 without GPUs or on a small box."""
    return max(1, min(gpus, cores // CORES_PER_HTTP_WORKER))
