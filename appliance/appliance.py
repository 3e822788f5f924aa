"""The composed appliance: catalogue (file or registry), supervisor (the model table, local
and remote), router.

``Appliance(settings)`` validates everything it can before any engine starts (the catalogue
file, every local model's source and engine settings), so a wrong ``models.yaml`` fails at
start with one clear message. ``start`` brings the catalogue's models up; a registry, when
configured, replaces the catalogue as it changes, and only the difference is applied.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.config_file import load_catalogue_file
from appliance.catalogue.registry_client import (
    READ_TOKEN_ENV,
    CatalogueSource,
    RegistryClient,
    RegistryPoller,
)
from appliance.catalogue.schema import CatalogueFile, ModelSpec
from appliance.catalogue.trust import RegistryGate
from appliance.engine_metrics import EngineMetrics
from appliance.engines.factory import EngineFactory
from appliance.engines.process_env import harden_environment
from appliance.engines.remote import RemoteBackends
from appliance.errors import ConfigError
from appliance.host import tp_overheads
from appliance.host.capacity import HostCapacity
from appliance.host.cpus import usable_cpus
from appliance.host.device_release import DeviceRelease, PsutilProcesses
from appliance.host.inventory import DeviceKind, GpuMonitor, Inventory, detect_inventory
from appliance.host.placement import PlacementPolicy
from appliance.hub.fetcher import HubFetcher
from appliance.hub.gguf import GgufCache
from appliance.metrics import Metrics
from appliance.router import Router
from appliance.settings import Settings, default_http_workers
from appliance.supervisor.handle import EngineMaker
from appliance.supervisor.lending_board import LendingBoard
from appliance.supervisor.load_gate import LoadGate
from appliance.supervisor.states import ModelState
from appliance.supervisor.supervisor import Supervisor
from appliance.usage.ledger import UsageLedger
from appliance.usage.store import UsageStore

log = logging.getLogger("appliance")


def _warn_if_plain_http(url: str) -> None:
    """Say at start that a registry over plain HTTP off this host can be impersonated."""
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning(
            "registry %s is plain HTTP: anyone on the path can answer in its place (its "
            "entries are still checked as untrusted); use https://",
            url,
            extra={"event": "registry_plain_http"},
        )


def registry_read_token(
    config: CatalogueFile, config_path: Path, env: Mapping[str, str]
) -> SecretStr | None:
    """The token sent to the registry on reads: models.yaml's ``registry_token_file`` (relative
    to models.yaml), else ``APPLIANCE_REGISTRY_READ_TOKEN``, else None."""
    if config.registry_token_file is not None:
        path = config.registry_token_file
        if not path.is_absolute():
            path = config_path.resolve().parent / path
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{config_path}: registry_token_file {str(path)!r}: cannot read it: {exc.strerror}"
            ) from None
        if not text:
            raise ConfigError(f"{config_path}: registry_token_file {str(path)!r} is empty")
        return SecretStr(text)
    value = env.get(READ_TOKEN_ENV, "").strip()
    return SecretStr(value) if value else None


def _sleep_host_budget_gib(configured: float | None) -> float:
    """Host RAM that level-1 sleeping models may fill: as configured, else a quarter of RAM."""
    if configured is not None:
        return configured
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0.0
    return total / 2**30 / 4


class Appliance:
    """Everything behind the HTTP edge."""

    def __init__(
        self,
        settings: Settings,
        *,
        engines: EngineMaker | None = None,
        inventory: Inventory | None = None,
    ) -> None:
        """``engines`` makes the local engines (default: vLLM's, through ``EngineFactory``);
        ``inventory`` is the host's devices (default: detected). Tests give their own."""
        self.settings = settings
        config = load_catalogue_file(settings.config_path)
        # The operator's environment, before the engine factory sets what vLLM must read.
        environ = dict(os.environ)
        # Refuse vLLM switches that open it to clients (insecure serialisation) at start.
        harden_environment(os.environ, None)
        # vLLM's per-step engine figures, only when asked for (they cost work on every step);
        # their registry joins the appliance's once that exists.
        self.engine_metrics = (
            EngineMetrics(CollectorRegistry()) if settings.engine_metrics else None
        )
        # One cache for the factory (where an engine finds a converted folder) and the fetcher
        # (which converts): it remembers each file's hash.
        gguf = GgufCache(settings.conversion_cache_path())
        factory = (
            EngineFactory(
                base_dir=settings.config_path.resolve().parent,
                cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
                figures=self.engine_metrics,
                gguf=gguf,
                ray=config.ray,
            )
            if engines is None or inventory is None
            else None
        )
        self.engines: EngineMaker = engines or factory  # type: ignore[assignment]
        self.ray = factory.ray if factory is not None else None  # Ray entries' shared parts
        for spec in config.models:
            self.engines.validate(spec)
        self.inventory = inventory or detect_inventory(
            settings.cpu_memory_budget_gib,
            environ=environ,
            cuda_build=factory is not None and factory.cuda_build,
        )
        on_gpu = self.inventory.kind is DeviceKind.GPU
        # Only the inventory's GPUs: those in MIG mode or hidden by CUDA_VISIBLE_DEVICES are
        # not the appliance's to report.
        self.gpus = GpuMonitor([d.index for d in self.inventory.devices] if on_gpu else None)
        self.workers = settings.workers or default_http_workers(
            len(self.inventory.devices) if on_gpu else 0, usable_cpus()
        )
        if factory is not None:
            # Every HTTP worker holds its own client of each engine core (issue 16).
            factory.clients = self.workers
        self.catalogue = Catalogue(config.models, CatalogueSource.FILE)
        self.metrics = Metrics(
            catalogue=self.catalogue,
            registry_status=self.registry_status,
            remote_status=self.remote_up,
            # Without GPUs there is nothing to read: skip NVML at every scrape.
            gpu_memory=self.gpus.read if on_gpu else list,
        )
        if self.engine_metrics is not None:
            self.metrics.registry.register(self.engine_metrics.registry)
        # Registry backends' connections check each address they connect to (DNS rebinding).
        self.remotes = RemoteBackends(
            settings.remote, guard=lambda address: self.registry_gate.refused(address)
        )
        self.supervisor = Supervisor(
            self.inventory,
            self.engines,
            limits=settings.limits,
            observer=self.metrics,
            remotes=self.remotes,
            capacity=HostCapacity(
                self.inventory,
                policy=tp_overheads.policy_for(
                    PlacementPolicy.from_settings(config.placement),
                    settings.config_path,
                    self.inventory,
                ),
                default_share=settings.limits.default_memory_share,
                cpu_default_gib=settings.limits.cpu_default_model_gib,
                free_memory=self.gpus.free_gib if on_gpu else None,
                sleep_host_budget_gib=_sleep_host_budget_gib(
                    config.placement.sleep_host_budget_gib
                ),
                release=DeviceRelease(
                    self.gpus.usage,
                    PsutilProcesses(),
                    timeout_seconds=settings.limits.device_release_seconds,
                )
                if on_gpu
                else None,
            ),
            fetcher=HubFetcher(
                base_dir=settings.config_path.resolve().parent,
                reserve_bytes=settings.disk_reserve_bytes(),
                gguf=gguf,
            ),
        )
        # Private to this process until HTTP workers share one (``lend_through``).
        self.supervisor.lend_through(LendingBoard.private(settings.auth.rate_windows()))
        self.supervisor.capacity.check_catalogue(config.models)
        self.metrics.bind(supervisor=self.supervisor)
        self.usage = UsageLedger(
            UsageStore(settings.usage_db_path()),
            key_names=[key.name for key in settings.auth.keys],
            quotas=settings.quotas,
            registry=self.metrics.registry,
            model_label=self.metrics.model_label,
        )
        # One gate for every model route: its caps count on-demand loads whatever route asked.
        on_demand = LoadGate(self.supervisor, settings.on_demand)
        self.router = Router(self.catalogue, self.supervisor, load_gate=on_demand)
        self.registry: RegistryPoller | None = None
        self.registry_gate = RegistryGate(config.registry_trust)
        if config.registry_url is not None:
            _warn_if_plain_http(config.registry_url)
            self.registry = RegistryPoller(
                RegistryClient(
                    config.registry_url,
                    timeout=settings.registry_timeout_seconds,
                    token=registry_read_token(config, settings.config_path, os.environ),
                    max_entries=config.registry_trust.max_entries,
                ),
                ttl=config.registry_ttl,
                fallback=config.models,
                on_change=self._catalogue_changed,
            )
        self._started = False

    async def start(self) -> None:
        """Take the catalogue (the registry's, if it answers), then start its models."""
        log.info("devices: %s", self.inventory.describe(), extra={"event": "inventory"})
        if self.registry is not None:
            await self.registry.start()
        await self.remotes.sync(
            self.catalogue.specs(), untrusted=self.catalogue.origin is not CatalogueSource.FILE
        )
        await self.remotes.start()
        await self.supervisor.start(self.catalogue.specs())
        self.usage.start()
        self._started = True

    async def stop(self) -> None:
        """Stop following the registry, drain and stop every engine, close backends."""
        if self.registry is not None:
            await self.registry.stop()
        if self.ray is not None:  # Ray entries' apps outlive the appliance, for the next run
            self.ray.keep_apps_running()
        await self.supervisor.shutdown()
        await self.remotes.close()
        self.gpus.close()
        await self.usage.stop()

    async def _admitted(self, specs: Sequence[ModelSpec]) -> list[ModelSpec]:
        """The registry's entries that pass the operator's ``registry_trust`` (untrusted
        input: a refused entry is logged and left out, the rest are served)."""
        admitted = []
        for spec in specs:
            try:
                admitted.append(await self.registry_gate.admit(spec))
            except ConfigError as exc:
                log.error(
                    "registry entry refused: %s",
                    exc.message,
                    extra={"event": "registry_entry_refused", "model": spec.name},
                )
        return admitted

    def _servable(self, specs: Sequence[ModelSpec]) -> list[ModelSpec]:
        """The entries this appliance can serve; a bad registry entry must not stop the rest."""
        good = []
        for spec in specs:
            try:
                self.engines.validate(spec)
            except ConfigError as exc:
                log.error("catalogue entry skipped: %s", exc.message, extra={"model": spec.name})
                continue
            good.append(spec)
        return good

    async def _apply(self, specs: Sequence[ModelSpec], *, untrusted: bool) -> dict[str, list[str]]:
        """Put ``specs`` in the model table; return what changed.

        The backends first: a request for a new registry entry, arriving while the table
        changes, must get an engine on the guarded client. Then again once the table is
        applied, to drop an engine a request re-made for an entry that was just removed.
        """
        await self.remotes.sync(specs, untrusted=untrusted)
        changes = await self.supervisor.apply_catalogue(specs)
        await self.remotes.sync(specs, untrusted=untrusted)
        return changes

    async def _catalogue_changed(self, specs: list[ModelSpec], source: CatalogueSource) -> None:
        """The registry poller's callback: put the new catalogue in force."""
        if source is not CatalogueSource.FILE:
            specs = await self._admitted(specs)
        specs = self._servable(specs)
        if self._started:
            changes = await self._apply(specs, untrusted=source is not CatalogueSource.FILE)
            log.info(
                "catalogue changed", extra={"event": "catalogue", "source": source.value, **changes}
            )
        self.catalogue.replace(specs, source)

    async def load(self, name: str) -> list[str]:
        """Load ``name``; return the models evicted to make room."""
        handle = self.supervisor.get(name)
        was_ready = handle.state is ModelState.READY
        await self.supervisor.load(name)
        return [] if was_ready else list(handle.evicted)

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the catalogue file and apply only the difference.

        With a registry, the file is the fallback: it is re-read (and must be valid), then the
        registry is asked again.
        """
        config = load_catalogue_file(self.settings.config_path)
        for spec in config.models:
            self.engines.validate(spec)
        self.supervisor.capacity.check_catalogue(config.models)
        if self.registry is not None:
            self.registry_gate = RegistryGate(config.registry_trust)
            self.registry.replace_fallback(config.models)
            await self.registry.refresh()
            return {"added": [], "removed": [], "changed": []}
        changes = await self._apply(config.models, untrusted=False)
        self.catalogue.replace(config.models, CatalogueSource.FILE)
        log.info("catalogue reloaded", extra={"event": "reload", **changes})
        return changes

    def remote_up(self) -> dict[str, bool]:
        """Each remote model's backend: up or not."""
        return self.remotes.up()

    def registry_status(self) -> dict[str, Any]:
        """Whether a registry is configured and up, and the catalogue source."""
        if self.registry is None:
            return {"configured": False, "up": None, "source": self.catalogue.origin.value}
        return {"configured": True, **self.registry.status().model_dump(mode="json")}
