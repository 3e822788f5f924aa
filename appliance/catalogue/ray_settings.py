"""``ray:`` in ``models.yaml``: the Ray cluster (once per file) and how an entry runs on it.

An entry with ``ray:`` is deployed on the operator's Ray cluster as a Ray Serve LLM app
(``appliance.engines.ray``) instead of an engine on this host. Only ``models.yaml`` may say
so: the registry is untrusted and its entries never carry ``ray:`` (``catalogue.trust``).
"""

from __future__ import annotations

import enum
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# host:port, or ray://host:port (Ray Client), or "auto" (the cluster this host is part of).
_ADDRESS = re.compile(
    r"^(auto|(ray://)?[A-Za-z0-9._-]+:[0-9]{1,5}|(ray://)?\[[0-9a-fA-F:]+\]:[0-9]{1,5})$"
)
_RESOURCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.-]{0,63}$")


class RayCluster(BaseModel):
    """The Ray cluster that entries with ``ray:`` run on (``ray:`` at the top of the file)."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(
        description=(
            "The cluster: host:port of its head (GCS), ray://host:port (Ray Client), or auto."
        )
    )
    namespace: str = Field(
        "appliance",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The Ray namespace the appliance connects in.",
    )
    serve_host: str = Field(
        "127.0.0.1",
        description=(
            "Where Ray Serve's HTTP proxy listens (on the head node only); the appliance "
            "relays requests to it. Keep it on loopback: the proxy has no keys of its own."
        ),
    )
    serve_port: int = Field(
        8700, ge=1, le=65535, description="Port of Ray Serve's HTTP proxy on serve_host."
    )
    deploy_timeout: float = Field(
        900.0,
        gt=0,
        description="Seconds a deployment may take to become healthy before it is failed.",
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError("give host:port, ray://host:port or auto")
        return value


class Accelerator(str, enum.Enum):
    """What a replica's engine runs on (Ray Serve LLM's ``accelerator_config.kind``)."""

    CPU = "cpu"
    GPU = "gpu"
    TPU = "tpu"


class Strategy(str, enum.Enum):
    """How a replica's bundles are put on nodes (a Ray placement-group strategy)."""

    PACK = "PACK"  # as few nodes as fit; spills over
    STRICT_PACK = "STRICT_PACK"  # one node, or nothing
    SPREAD = "SPREAD"  # as many nodes as there are, best effort
    STRICT_SPREAD = "STRICT_SPREAD"  # one node per bundle, or nothing


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling of an entry's replicas."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(ge=1, le=1024)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Requests per replica Ray Serve scales towards."
    )

    @model_validator(mode="after")
    def _check(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is more than max_replicas")
        return self


class Router(str, enum.Enum):
    """How Ray Serve picks a replica for a request."""

    POWER_OF_TWO = "power_of_two"  # Ray Serve's default: the less busy of two random replicas
    PREFIX_CACHE = "prefix_cache"  # Ray Serve LLM's PrefixCacheAffinityRouter


class RayEntry(BaseModel):
    """How one entry runs on the Ray cluster (``ray:`` in the entry)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(
        None, ge=1, le=1024, description="Copies of the model (default 1 without autoscaling)."
    )
    autoscaling: Autoscaling | None = Field(
        None, description="Let Ray Serve scale the copies between min and max (not replicas)."
    )
    accelerator: Accelerator = Field(Accelerator.GPU, description="cpu, gpu or tpu.")
    accelerator_type: str | None = Field(
        None,
        max_length=64,
        description="A Ray accelerator type the replicas must run on (A100, H100, L4...).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Ray resources of each engine worker (a replica has tensor x pipeline parallel "
            "workers), such as {CPU: 1, GPU: 1}; default: one of the accelerator."
        ),
    )
    strategy: Strategy | None = Field(
        None, description="How a replica's workers go on nodes (default: Ray Serve LLM's)."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs a stage spans.")
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="Stages a replica spans (each may be on another node)."
    )
    router: Router = Field(Router.POWER_OF_TWO, description="power_of_two or prefix_cache.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one replica takes at once (default: Ray Serve's)."
    )

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not _RESOURCE.match(name):
                raise ValueError(f"resource {name!r} is not a Ray resource name")
            if not amount > 0:
                raise ValueError(f"resource {name!r}: amount must be more than 0")
        return value

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> RayEntry:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give replicas or autoscaling, not both")
        return self

    def worker_bundle(self) -> dict[str, float]:
        """The Ray resources of one engine worker: ``resources``, or one of the accelerator."""
        if self.resources:
            return dict(self.resources)
        if self.accelerator is Accelerator.CPU:
            return {"CPU": 1.0}
        return {self.accelerator.value.upper(): 1.0}
