"""The file-wide sections of ``models.yaml`` besides its models: ``registry_trust:`` and
``placement:`` (``ray:`` is in ``ray_settings``)."""

from __future__ import annotations

import enum
from ipaddress import IPv4Network, IPv6Network

from pydantic import BaseModel, ConfigDict, Field


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
