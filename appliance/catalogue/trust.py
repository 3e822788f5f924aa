"""Registry entries are untrusted input: the checks an entry passes before it is served.

``models.yaml`` is the operator's and is trusted; the registry is not (anyone who can write to
it, or answer in its place, writes these entries). So a registry entry may name a hub id or a
backend URL, never a local path, a ``package:`` source or Python code to run: its engine
settings pass an allow-list, its backend's addresses are checked after DNS resolution, and it
does not load by itself. ``models.yaml``'s ``registry_trust:`` opens each of these further.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from appliance.catalogue.file_settings import RegistryTrust
from appliance.catalogue.schema import LocalModelSpec, ModelSpec, RemoteModelSpec
from appliance.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""Host name and port to the addresses they resolve to (as text); ``OSError`` if none."""

DEFAULT_ENGINE_SETTINGS = frozenset(
    {
        # Sizes, precisions and scheduling: they change what the engine costs, not what runs.
        "max_model_len",
        "dtype",
        "quantization",
        "kv_cache_dtype",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "block_size",
        "seed",
        "enforce_eager",
        "max_logprobs",
        "revision",
        "tokenizer_mode",
        "enable_sleep_mode",
    }
)
"""Engine settings a registry entry may use unless models.yaml allows more. Everything else
is refused: among them ``trust_remote_code``, plugins, worker and logits-processor classes,
paths (``tokenizer``, ``download_dir``, ``generation_config``, chat templates), media paths
(``allowed_local_media_path``) and logging switches."""

# Cloud instance-metadata services: reaching one from the box hands out its credentials.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
# A hub revision: a commit, a branch or tag (``main``, ``v1.0``, ``refs/pr/1``). It is joined
# into cache paths (``refs/<revision>``), so no ``..``, no leading dot or slash, nothing else.
_REVISION = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
MAX_REVISION_CHARS = 128
REVISION_SETTINGS = ("revision", "tokenizer_revision", "code_revision")
MAX_REGISTRY_LOGPROBS = 20
"""``max_logprobs`` a registry entry may set: vLLM's default, OpenAI's ``top_logprobs`` cap
(``-1``, the whole vocabulary per token, is for models.yaml to choose)."""


def safe_revision(value: object) -> bool:
    """Whether ``value`` is a hub revision that is safe to join into a cache path."""
    return (
        isinstance(value, str) and len(value) <= MAX_REVISION_CHARS and bool(_REVISION.match(value))
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class UntrustedEntryError(ConfigError):
    """A registry entry asks for something only models.yaml may ask for."""

    code = "untrusted_entry"


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, through the event loop's resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def refused_address(address: IPAddress, allowed: Iterable[ipaddress._BaseNetwork]) -> str | None:
    """Why a backend may not be at ``address`` (loopback, link-local, metadata...), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "not a unicast address"
    return None


class RegistryGate:
    """Admits registry entries under the operator's ``registry_trust`` settings."""

    def __init__(self, trust: RegistryTrust, resolve: Resolver = resolve_host) -> None:
        self._trust = trust
        self._resolve = resolve
        self._engine_settings = DEFAULT_ENGINE_SETTINGS | {
            _key(name) for name in trust.engine_settings
        }

    def refused(self, address: IPAddress) -> str | None:
        """Why a registry backend may not be at ``address`` (checked again at connect time)."""
        return refused_address(address, self._trust.backend_networks)

    async def admit(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` as it may be served (autoload off unless trusted); ``UntrustedEntryError``
        naming the model and the reason if it may not be served at all."""
        if isinstance(spec, RemoteModelSpec):
            await self._check_backend(spec)
            return spec  # nothing loads for a remote entry
        if spec.ray is not None:
            # A Ray deployment runs the entry's settings on the operator's cluster, and Ray's
            # own API is code execution: only models.yaml may send an entry there.
            raise _refuse(spec, "ray", "only models.yaml may run an entry on the Ray cluster")
        self._check_source(spec)
        self._check_engine(spec)
        if self._trust.autoload:
            return spec
        return spec.model_copy(update={"autoload": False, "load_on_demand": False})

    def _check_source(self, spec: LocalModelSpec) -> None:
        self._check_hub_id(spec, "source", spec.source)
        # A LoRA adapter's weights are loaded like the model's: hub ids only, same rules.
        for index, adapter in enumerate(spec.adapters):
            self._check_hub_id(spec, f"adapters.{index}.source", adapter.source)

    def _check_hub_id(self, spec: LocalModelSpec, field: str, source: str) -> None:
        if not _HUB_ID.match(source) or ".." in source:
            raise _refuse(
                spec, field, "a registry entry may name a hub id (org/name) only, not a path"
            )
        if Path(source).exists():
            # vLLM loads a folder of that name when there is one, before asking the hub.
            raise _refuse(spec, field, "names a folder on this host, not a hub id")
        orgs = self._trust.hub_orgs
        if orgs is not None and source.split("/", 1)[0] not in orgs:
            raise _refuse(spec, field, "its hub organisation is not in registry_trust.hub_orgs")

    def _check_engine(self, spec: LocalModelSpec) -> None:
        refused = sorted(k for k in spec.engine if _key(k) not in self._engine_settings)
        if refused:
            raise _refuse(
                spec,
                "engine",
                f"engine setting(s) {', '.join(refused)} are not allowed from the registry "
                "(models.yaml may allow them in registry_trust.engine_settings)",
            )
        engine = {_key(k): v for k, v in spec.engine.items()}
        for name in REVISION_SETTINGS:
            if name in engine and not safe_revision(engine[name]):
                raise _refuse(
                    spec, f"engine.{name}", "not a commit, branch or tag name (A-Z, 0-9, ._-/)"
                )
        logprobs = engine.get("max_logprobs")
        if "max_logprobs" in engine and not (
            isinstance(logprobs, int)
            and not isinstance(logprobs, bool)
            and 0 <= logprobs <= MAX_REGISTRY_LOGPROBS
        ):
            raise _refuse(
                spec,
                "engine.max_logprobs",
                f"must be 0 to {MAX_REGISTRY_LOGPROBS} from the registry (-1, the whole "
                "vocabulary, costs memory and time per token; models.yaml may choose it)",
            )

    async def _check_backend(self, spec: RemoteModelSpec) -> None:
        parts = urlsplit(spec.backend_url)
        host = parts.hostname or ""
        hosts = self._trust.backend_hosts
        if hosts is not None and host not in hosts:
            raise _refuse(spec, "backend_url", "its host is not in registry_trust.backend_hosts")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self._resolve(host, port)
        except OSError:
            raise _refuse(spec, "backend_url", f"host {host!r} does not resolve") from None
        for text in addresses:
            why = refused_address(
                ipaddress.ip_address(text.split("%", 1)[0]), self._trust.backend_networks
            )
            if why is not None:
                raise _refuse(
                    spec,
                    "backend_url",
                    f"host {host!r} resolves to {why} (models.yaml may allow it in "
                    "registry_trust.backend_networks)",
                )


def _key(name: str) -> str:
    return name.replace("-", "_")


def _refuse(spec: ModelSpec, field: str, why: str) -> UntrustedEntryError:
    return UntrustedEntryError(
        f"model {spec.name!r}: field {field!r}: registry entry refused: {why}", param=field
    )
