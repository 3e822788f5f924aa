"""A catalogue entry and the ``models.yaml`` file, as pydantic models.

Unknown keys are refused everywhere (``extra="forbid"``): a misspelt setting must fail at start,
not be silently ignored. Engine settings are checked separately by vLLM's own argument parser
(see ``appliance.engines.vllm_engine.validate_engine_settings``).
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"

# Engine settings the appliance derives from the entry itself; setting them in ``engine:``
# would silently override placement (vLLM would take more memory, or other GPUs, than placed).
RESERVED_ENGINE_KEYS: dict[str, str] = {
    "model": "is set by the appliance from source",
    "served_model_name": "is set by the appliance from name",
    "tensor_parallel_size": "is set by the appliance from resources.tensor_parallel_size",
    "runner": "is set by the appliance from task",
    "gpu_memory_utilization": (
        "is set by placement from resources.memory_gib or resources.memory_share"
    ),
    "kv_cache_memory_bytes": (
        "would size the KV cache outside placement's budget; give resources.memory_gib instead"
    ),
    "device_ids": "is set by placement; pin GPUs with resources.devices",
}
# Engine settings that would make vLLM use more GPUs than placement gives it; 1 is allowed.
SINGLE_ENGINE_KEYS: dict[str, str] = {
    "pipeline_parallel_size": (
        "placement gives an engine resources.tensor_parallel_size GPUs; use tensor parallelism"
    ),
    "data_parallel_size": "run several entries (or replicas behind a backend_url) instead",
    "data_parallel_size_local": "run several entries (or replicas behind a backend_url) instead",
    "decode_context_parallel_size": "placement does not account for context parallelism",
    "prefill_context_parallel_size": "placement does not account for context parallelism",
}

# `vllm serve` settings of its own HTTP server (FrontendArgs in vLLM's cli_args.py), which the
# appliance's one server replaces: accepted, they would be silently ignored. Each names the
# appliance's option for the same thing.
SERVER_ONLY_ENGINE_KEYS: dict[str, str] = {
    "host": "use `appliance up --host`",
    "port": "use `appliance up --port`",
    "uds": "the appliance listens on TCP (`appliance up --host/--port`)",
    "grpc_port": "the appliance serves HTTP only",
    "api_key": "use API keys (`appliance up --api-keys FILE`, APPLIANCE_API_KEYS)",
    "allowed_origins": "use `appliance up --cors-origin`",
    "allow_credentials": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "allowed_methods": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "allowed_headers": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "ssl_keyfile": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_certfile": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_ca_certs": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_cert_reqs": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_ciphers": "terminate TLS in a reverse proxy in front of the appliance",
    "enable_ssl_refresh": "terminate TLS in a reverse proxy in front of the appliance",
    "root_path": "the appliance's routes are at the root; a proxy may strip a prefix",
    "middleware": "the appliance's middleware is fixed (keys, limits, request ids, logs)",
    "uvicorn_log_level": "use `appliance up --log-level`",
    "disable_uvicorn_access_log": "the appliance writes its own access log",
    "disable_access_log_for_endpoints": "the appliance writes its own access log",
    "enable_request_id_headers": "the appliance always returns X-Request-Id",
    "disable_fastapi_docs": "the appliance's /docs follow its keys file (public: [docs])",
    "enable_offline_docs": "the appliance's /docs are its own",
    "enable_server_load_tracking": "the appliance's /metrics count requests in flight",
    "data_parallel_supervisor_port": "the appliance runs one engine per entry",
    "dp_supervisor_probe_interval_s": "the appliance runs one engine per entry",
    "dp_supervisor_probe_timeout_s": "the appliance runs one engine per entry",
    "dp_supervisor_probe_failure_threshold": "the appliance runs one engine per entry",
}


def check_server_only_keys(keys: dict[str, Any]) -> None:
    """Refuse ``vllm serve`` HTTP-server settings in ``engine:``, naming the appliance's own."""
    for key, instead in SERVER_ONLY_ENGINE_KEYS.items():
        if key in keys:
            raise ValueError(
                f"engine setting {key!r} is a setting of vllm serve's own HTTP server, which "
                f"the appliance replaces: {instead}"
            )


class Task(str, enum.Enum):
    """What a model does."""

    AUTO = "auto"  # vLLM picks the runner; the routes served are what the engine reports
    GENERATE = "generate"  # chat and text completions
    EMBED = "embed"  # embeddings (vLLM's pooling runner)


class Resources(BaseModel):
    """What a model needs from the host: devices, and memory on each."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs the model spans.")
    memory_gib: float | None = Field(
        None, gt=0, description="Memory needed on each device, in GiB (weights + KV cache)."
    )
    memory_share: float | None = Field(
        None, gt=0, le=1, description="Share of each device's memory (vLLM gpu_memory_utilization)."
    )
    devices: list[int] | None = Field(
        None, description="Pin to these device indices (as NVML numbers them)."
    )

    @model_validator(mode="after")
    def _check(self) -> Resources:
        if self.memory_gib is not None and self.memory_share is not None:
            raise ValueError("give memory_gib or memory_share, not both")
        if self.devices is not None:
            if len(set(self.devices)) != len(self.devices):
                raise ValueError("devices lists a device twice")
            if any(d < 0 for d in self.devices):
                raise ValueError("device indices are 0 or more")
            if len(self.devices) != self.tensor_parallel_size:
                raise ValueError(
                    f"devices pins {len(self.devices)} device(s) but tensor_parallel_size is "
                    f"{self.tensor_parallel_size}"
                )
        return self


def check_backend_url(value: str) -> str:
    """``value`` if it is scheme, host, port and an optional base path, without the final
    slash; ``ValueError`` saying what is wrong otherwise.

    Credentials, a query or a fragment are refused: the URL is shown to operators, logged and
    health-checked, and none of them belongs in a base URL (a backend's key goes in an
    environment variable, see ``RemoteSettings.api_key_env``).
    """
    if any(c.isspace() or not c.isprintable() for c in value) or "\\" in value:
        raise ValueError("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not value.startswith(parts.scheme + "://"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); use api_key_env")
    if parts.query or "?" in value:
        raise ValueError("must not have a query (?...)")
    if parts.fragment or "#" in value:
        raise ValueError("must not have a fragment (#...)")
    if ".." in parts.path.split("/"):
        raise ValueError("must not have '..' in its path")
    del port  # parsed only to check it is a number in range
    return value.rstrip("/")


class ModelSpec(BaseModel):
    """One catalogue entry: a model the appliance can serve, locally or through a backend."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="The name clients ask for.")
    version: str = Field("1", min_length=1, max_length=64)
    owner: str = Field("local", min_length=1, max_length=128)
    task: Task = Field(
        Task.AUTO,
        description=(
            "Optional: 'embed' asks vLLM for its pooling runner and 'generate' for its "
            "generate runner; by default vLLM picks, and the routes a model serves are what "
            "its engine reports."
        ),
    )
    source: str | None = Field(
        None,
        min_length=1,
        description=(
            "Hub id, local folder, or package:MODULE/PATH for a model shipped inside a Python "
            "package. Served by this appliance's own engines."
        ),
    )
    backend_url: str | None = Field(
        None, description="Base URL of another OpenAI-compatible server that serves this model."
    )
    autoload: bool = Field(True, description="Load at start-up.")
    load_on_demand: bool = Field(False, description="Load when a request asks for it.")
    keep_alive: float | None = Field(
        None, gt=0, description="Unload after this many idle seconds (None: never)."
    )
    evictable: bool = Field(False, description="May be unloaded to make room for another.")
    max_queue: int | None = Field(
        None,
        ge=1,
        description=(
            "Most requests in flight or waiting for this model; beyond it 429 with Retry-After "
            "(default: the appliance's --max-queue)."
        ),
    )
    resources: Resources = Field(default_factory=Resources)
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine settings (max_model_len, dtype, ...), as vllm serve takes them.",
    )

    @field_validator("backend_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_backend_url(value)

    @field_validator("engine")
    @classmethod
    def _check_engine_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        keys = {k.replace("-", "_"): v for k, v in value.items()}
        for key, why in RESERVED_ENGINE_KEYS.items():
            if key in keys:
                raise ValueError(f"engine setting {key!r} {why}; remove it from engine")
        check_server_only_keys(keys)
        for key, why in SINGLE_ENGINE_KEYS.items():
            if key in keys and keys[key] not in (None, 1, "1"):
                raise ValueError(f"engine setting {key!r} is not supported: {why}")
        backend = keys.get("distributed_executor_backend")
        if backend is not None and backend not in ("mp", "uni"):
            raise ValueError(
                f"engine setting distributed_executor_backend={backend!r} is not supported: "
                "with it the engine chooses its GPUs itself (Ray placement groups) and the "
                "appliance's placement cannot account for them; use 'mp' (the default), or "
                "serve such a model with its own `vllm serve` and name it by backend_url"
            )
        return value

    @model_validator(mode="after")
    def _check_location(self) -> ModelSpec:
        if (self.source is None) == (self.backend_url is None):
            raise ValueError("give exactly one of source (served here) or backend_url (remote)")
        if self.backend_url is not None and self.engine:
            raise ValueError("engine settings apply to local models only, not to a backend_url")
        return self

    @property
    def is_local(self) -> bool:
        """True when this appliance's own engines serve the model."""
        return self.source is not None


class RegistryTrust(BaseModel):
    """How far entries from the registry are trusted (models.yaml's ``registry_trust:``).

    The registry is untrusted input: by default its entries may name hub ids and backend URLs
    only, pass a short list of engine settings, and never load by themselves. Each field here
    is the operator opening one thing more.
    """

    model_config = ConfigDict(extra="forbid")

    autoload: bool = Field(
        False, description="Registry entries keep their autoload and load_on_demand."
    )
    engine_settings: list[str] = Field(
        default_factory=list,
        description="Engine settings registry entries may use beyond the default allow-list.",
    )
    hub_orgs: list[str] | None = Field(
        None, description="Only hub ids of these organisations (None: any organisation)."
    )
    backend_hosts: list[str] | None = Field(
        None, description="Only backend_urls on these host names or addresses (None: any)."
    )
    backend_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description=(
            "Addresses otherwise refused to registry backends (loopback, link-local, cloud "
            "metadata) that they may use, as networks such as 127.0.0.1/32."
        ),
    )
    max_entries: int = Field(
        1000, ge=1, description="A registry answer with more entries than this is refused."
    )


class Packing(str, enum.Enum):
    """How placement chooses among the GPUs a model fits on."""

    SPREAD = "spread"  # the emptiest GPUs first: a GPU per model while there are empty ones
    PACK = "pack"  # the tightest fit first: keeps whole GPUs free for big models


class PlacementSettings(BaseModel):
    """How models are put on GPUs (``placement:`` in ``models.yaml``); read at start."""

    model_config = ConfigDict(extra="forbid")

    packing: Packing = Field(Packing.SPREAD, description="spread (default) or pack.")
    gpu_headroom_gib: float = Field(
        1.0,
        ge=0,
        description=(
            "GiB one engine takes on each of its GPUs outside its vLLM budget (its CUDA "
            "context), which vLLM measures only after creating it."
        ),
    )
    tp_headroom_gib: float = Field(
        0.5, ge=0, description="More GiB per GPU for an engine spanning several (NCCL)."
    )
    sleep_host_budget_gib: float | None = Field(
        None,
        gt=0,
        description=(
            "Host RAM that level-1 sleeping models may fill with their weights "
            "(default: a quarter of the host's memory)."
        ),
    )


class CatalogueFile(BaseModel):
    """The whole ``models.yaml``."""

    model_config = ConfigDict(extra="forbid")

    placement: PlacementSettings = Field(default_factory=PlacementSettings)

    registry_url: str | None = Field(
        None, description="Model registry service; models.yaml is the fallback when it is down."
    )
    registry_token_file: Path | None = Field(
        None,
        description=(
            "File holding the token sent to the registry on reads (else the environment "
            "variable APPLIANCE_REGISTRY_READ_TOKEN)."
        ),
    )
    registry_trust: RegistryTrust = Field(default_factory=RegistryTrust)
    registry_ttl: float = Field(30.0, gt=0, description="Seconds a registry answer stays fresh.")
    models: list[ModelSpec] = Field(default_factory=list)

    @field_validator("registry_url")
    @classmethod
    def _check_registry_url(cls, value: str | None) -> str | None:
        # The same rules as a backend's: a token in the URL would be logged and shown.
        return None if value is None else check_backend_url(value)

    @model_validator(mode="after")
    def _unique_names(self) -> CatalogueFile:
        seen: set[str] = set()
        for spec in self.models:
            if spec.name in seen:
                raise ValueError(f"model {spec.name!r} is declared twice")
            seen.add(spec.name)
        return self
