"""A catalogue entry and the ``models.yaml`` file, as pydantic models.

Unknown keys are refused everywhere (``extra="forbid"``): a misspelt setting must fail at start,
not be silently ignored. Engine settings are checked separately by vLLM's own argument parser
(see ``appliance.engines.vllm.args.EngineArgsBuilder``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

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
    "num_gpu_blocks_override": (
        "would size the KV cache by block count, past placement's memory budget; give "
        "resources.memory_gib instead"
    ),
}
# vLLM's GPU video decoder (vllm/multimodal/video_decoders: requires_gpu=True).
_GPU_VIDEO_BACKENDS = frozenset({"pynvvideocodec"})
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


def _check_frontend_gpu(keys: dict[str, Any]) -> None:
    """Refuse multimodal work on the GPU in the front-end processes.

    vLLM runs GPU video decoding and device-side multimodal processing in every API process
    (``mm_ipc_gpu_memory_gb``, ``vllm/multimodal/gpu_ipc_memory.py``): here that is the
    appliance's own process and its HTTP workers, which have every GPU visible, so each
    would make a CUDA context on the first GPU, outside placement.
    """
    why = (
        "would run GPU multimodal work in the appliance's front-end processes (a CUDA "
        "context on the first GPU, outside placement); decode on the CPU"
    )
    if float(keys.get("mm_ipc_gpu_memory_gb") or 0) > 0:
        raise ValueError(f"engine setting 'mm_ipc_gpu_memory_gb' {why}")
    if str(keys.get("mm_processor_device") or "auto") not in ("auto", "cpu"):
        raise ValueError(f"engine setting 'mm_processor_device' {why}")
    processor = keys.get("mm_processor_kwargs") or {}
    if isinstance(processor, dict) and str(processor.get("device", "cpu")).split(":")[0] not in (
        "cpu",
    ):
        raise ValueError(f"engine setting 'mm_processor_kwargs.device' {why}")
    video = (keys.get("media_io_kwargs") or {}).get("video", {})
    if isinstance(video, dict):
        gpu_backend = {video.get("backend"), video.get("video_backend")} & _GPU_VIDEO_BACKENDS
        on_cuda = str(video.get("device", "cpu")).startswith("cuda")
        if gpu_backend or on_cuda:
            raise ValueError(f"engine setting 'media_io_kwargs.video' {why}")


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


LOCAL_ONLY_FIELDS = (
    "source",
    "adapters",
    "autoload",
    "load_on_demand",
    "keep_alive",
    "evictable",
    "resources",
    "engine",
    "max_in_engine",
)
"""Fields of a local model that mean nothing for a remote backend (its server decides)."""
REMOTE_ONLY_FIELDS = ("backend_url", "backend_model")
"""Fields of a remote backend that mean nothing for a local model."""

_EXACTLY_ONE = "give exactly one of source (served here) or backend_url (remote)"


class _EntryBase(BaseModel):
    """What every catalogue entry has, local or remote."""

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
    max_queue: int | None = Field(
        None,
        ge=1,
        description=(
            "Most requests in flight or waiting for this model; beyond it 429 with Retry-After "
            "(default: the appliance's --max-queue)."
        ),
    )
    aliases: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "More names clients may ask for (stable names such as gpt-4o-mini); answers name "
            "the model by its name, as vllm serve --served-model-name NAME ALIAS does."
        ),
    )

    @field_validator("aliases")
    @classmethod
    def _distinct_aliases(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists an alias twice")
        return value

    @model_validator(mode="after")
    def _alias_is_not_the_name(self) -> _EntryBase:
        if self.name in self.aliases:
            raise ValueError(f"alias {self.name!r} is the entry's own name")
        return self

    def names(self) -> list[str]:
        """Every name the entry answers to: its name first, then its aliases."""
        return [self.name, *self.aliases]

    def adapter_names(self) -> list[str]:
        """The names of the LoRA adapters declared on this entry (none for a remote one)."""
        return []


class AdapterSpec(BaseModel):
    """A LoRA adapter of a local model: a name clients ask for, and where its weights are."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="The name clients ask for.")
    source: str = Field(
        min_length=1, max_length=1024, description="Local folder (PEFT format) or hub id."
    )


class LocalModelSpec(_EntryBase):
    """A catalogue entry served by this appliance's own engines (it has a ``source``)."""

    source: str = Field(
        min_length=1,
        description=(
            "Hub id, local folder, or package:MODULE/PATH for a model shipped inside a Python "
            "package. Served by this appliance's own engines."
        ),
    )
    autoload: bool = Field(True, description="Load at start-up.")
    load_on_demand: bool = Field(False, description="Load when a request asks for it.")
    keep_alive: float | None = Field(
        None, gt=0, description="Unload after this many idle seconds (None: never)."
    )
    evictable: bool = Field(False, description="May be unloaded to make room for another.")
    resources: Resources = Field(default_factory=Resources)
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters served on this model's engine, each under its own name.",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine settings (max_model_len, dtype, ...), as vllm serve takes them.",
    )
    max_in_engine: int | None = Field(
        None,
        ge=1,
        description=(
            "Requests let into the engine at once; the rest wait in the appliance's queue, by "
            "priority and fair share across keys (None: the engine's max_num_seqs)."
        ),
    )

    def adapter_names(self) -> list[str]:
        """The names of the LoRA adapters declared on this model."""
        return [adapter.name for adapter in self.adapters]

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, value: list[AdapterSpec]) -> list[AdapterSpec]:
        names = [adapter.name for adapter in value]
        if len(set(names)) != len(names):
            raise ValueError("names an adapter twice")
        return value

    @field_validator("engine")
    @classmethod
    def _lora_is_the_appliances(cls, value: dict[str, Any]) -> dict[str, Any]:
        if any(k.replace("-", "_") == "lora_modules" for k in value):
            raise ValueError(
                "engine setting 'lora_modules' is set by the appliance from adapters; list "
                "them under adapters (name, source) instead"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _needs_a_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | set(REMOTE_ONLY_FIELDS)
            if (
                data.get("source") is None
                and data.get("backend_url") is None
                # With an unknown field (a misspelt source, say) both errors are reported.
                and set(data) <= known
            ):
                raise ValueError(_EXACTLY_ONE)
            if "backend_url" in data and data["backend_url"] is None:
                data = {k: v for k, v in data.items() if k != "backend_url"}
        return data

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
        _check_frontend_gpu(keys)
        backend = keys.get("distributed_executor_backend")
        if backend is not None and backend not in ("mp", "uni"):
            raise ValueError(
                f"engine setting distributed_executor_backend={backend!r} is not supported: "
                "with it the engine chooses its GPUs itself (Ray placement groups) and the "
                "appliance's placement cannot account for them; use 'mp' (the default), or "
                "serve such a model with its own `vllm serve` and name it by backend_url"
            )
        return value


class RemoteModelSpec(_EntryBase):
    """A catalogue entry served by another OpenAI-compatible server (it has a ``backend_url``)."""

    backend_url: str = Field(
        description="Base URL of another OpenAI-compatible server that serves this model."
    )
    backend_model: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The model's name on the backend, when it differs from this entry's name.",
    )

    @property
    def upstream_name(self) -> str:
        """The name the backend knows the model by."""
        return self.backend_model or self.name

    @model_validator(mode="before")
    @classmethod
    def _no_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "source" in data:
            if data["source"] is not None:
                raise ValueError(_EXACTLY_ONE)
            data = {k: v for k, v in data.items() if k != "source"}
        return data

    @field_validator("backend_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_backend_url(value)


_LOCAL_TAG = "local"
_REMOTE_TAG = "remote"
SPEC_KIND_TAGS = (_LOCAL_TAG, _REMOTE_TAG)
"""The tags pydantic puts in an error's location after the entry's index."""


def _kind_of(value: Any) -> str:
    """Which kind of entry ``value`` is: remote when it names a ``backend_url``."""
    if isinstance(value, dict):
        return _REMOTE_TAG if value.get("backend_url") is not None else _LOCAL_TAG
    return _REMOTE_TAG if isinstance(value, RemoteModelSpec) else _LOCAL_TAG


ModelSpec = Annotated[
    Annotated[LocalModelSpec, Tag(_LOCAL_TAG)] | Annotated[RemoteModelSpec, Tag(_REMOTE_TAG)],
    Discriminator(_kind_of),
]
"""One catalogue entry: a local model or a remote backend, told apart by ``backend_url``."""

_SPEC_ADAPTER: TypeAdapter[LocalModelSpec | RemoteModelSpec] = TypeAdapter(ModelSpec)


def untagged_error(error: Mapping[str, Any], at: int = 0) -> dict[str, Any]:
    """A pydantic error about an entry (at position ``at`` of its location) told in the
    entry's terms: without the kind pydantic tried, and a field of the other kind said to
    not apply rather than to be unknown."""
    loc = list(error.get("loc", ()))
    if len(loc) <= at or loc[at] not in SPEC_KIND_TAGS:
        return dict(error)
    kind = loc.pop(at)
    told = {**error, "loc": tuple(loc)}
    field = loc[at] if len(loc) > at else None
    other = LOCAL_ONLY_FIELDS if kind == _REMOTE_TAG else REMOTE_ONLY_FIELDS
    if error.get("type") == "extra_forbidden" and field in other:
        what = "a remote backend (backend_url)" if kind == _REMOTE_TAG else "a local model"
        told["type"] = "not_for_kind"
        told["msg"] = f"does not apply to {what}"
    return told


def parse_model_spec(data: Any) -> LocalModelSpec | RemoteModelSpec:
    """One catalogue entry from plain data; ``pydantic.ValidationError`` if it is wrong."""
    return _SPEC_ADAPTER.validate_python(data)


def parse_model_spec_json(data: str | bytes) -> LocalModelSpec | RemoteModelSpec:
    """One catalogue entry from JSON; ``pydantic.ValidationError`` if it is wrong."""
    return _SPEC_ADAPTER.validate_json(data)


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
        owner: dict[str, str] = {}
        for spec in self.models:
            if spec.name in owner:
                if owner[spec.name] == spec.name:
                    raise ValueError(f"model {spec.name!r} is declared twice")
                raise ValueError(
                    f"model {spec.name!r}: is already an alias of {owner[spec.name]!r}"
                )
            owner[spec.name] = spec.name
        for spec in self.models:
            for alias in spec.aliases:
                if alias in owner:
                    raise ValueError(
                        f"model {spec.name!r}: alias {alias!r} is already a name or alias of "
                        f"{owner[alias]!r}"
                    )
                owner[alias] = spec.name
        for spec in self.models:
            for adapter in spec.adapter_names():
                if adapter in owner:
                    raise ValueError(
                        f"model {spec.name!r}: adapter {adapter!r} is already a name, alias or "
                        f"adapter of {owner[adapter]!r}"
                    )
                owner[adapter] = spec.name
        return self
