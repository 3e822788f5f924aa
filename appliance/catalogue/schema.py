"""A catalogue entry and the ``models.yaml`` file, as pydantic models.

Unknown keys are refused everywhere (``extra="forbid"``): a misspelt setting must fail at start,
not be silently ignored. Engine settings are checked separately by vLLM's own argument parser
(see ``appliance.engines.vllm.args.EngineArgsBuilder``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

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

from appliance.catalogue.engine_settings import check_engine_keys
from appliance.catalogue.file_settings import PlacementSettings, RegistryTrust
from appliance.catalogue.ray_settings import RayCluster, RayEntry
from appliance.catalogue.urls import check_backend_url

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


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
    "ray",
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
    ray: RayEntry | None = Field(
        None,
        description=(
            "Run on the Ray cluster of the file's ray: through Ray Serve LLM (replicas, "
            "autoscaling, several nodes) instead of on this host."
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

    @model_validator(mode="after")
    def _ray_is_not_placed_here(self) -> LocalModelSpec:
        if self.ray is None:
            return self
        if self.resources != Resources():
            raise ValueError(
                "resources places a model on this host's devices; a ray entry gives its "
                "resources per engine worker in ray.resources"
            )
        if self.adapters:
            raise ValueError(
                "adapters are not served on ray entries (Ray Serve LLM loads LoRA adapters "
                "from cloud storage only)"
            )
        return self

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
        return check_engine_keys(value)


def placed_here(spec: LocalModelSpec | RemoteModelSpec) -> bool:
    """Whether ``spec`` runs on this host's devices: a local model without ``ray:`` (a Ray
    entry runs on the Ray cluster, a remote one on its backend)."""
    return isinstance(spec, LocalModelSpec) and spec.ray is None


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
    ray: RayCluster | None = Field(
        None, description="The Ray cluster that entries with ray: run on (models.yaml only)."
    )
    models: list[ModelSpec] = Field(default_factory=list)

    @field_validator("registry_url")
    @classmethod
    def _check_registry_url(cls, value: str | None) -> str | None:
        # The same rules as a backend's: a token in the URL would be logged and shown.
        return None if value is None else check_backend_url(value)

    @model_validator(mode="after")
    def _ray_entries_have_a_cluster(self) -> CatalogueFile:
        if self.ray is None:
            for spec in self.models:
                if isinstance(spec, LocalModelSpec) and spec.ray is not None:
                    raise ValueError(
                        f"model {spec.name!r}: has ray: but the file names no Ray cluster; "
                        "add ray: {address: HOST:PORT} at the top of models.yaml"
                    )
        return self

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
