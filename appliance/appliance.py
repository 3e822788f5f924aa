"""The composed appliance: catalogue, supervisor and router, built from settings.

``build_appliance`` validates everything it can before any engine starts (the catalogue file,
every local model's source and engine settings), so a wrong ``models.yaml`` fails at start
with one clear message.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.catalogue.catalogue import Catalogue, CatalogueOrigin
from appliance.catalogue.config_file import load_catalogue_file
from appliance.catalogue.schema import ModelSpec
from appliance.engines.factory import EngineFactory
from appliance.engines.remote import RemoteBackends
from appliance.metrics import Metrics
from appliance.router import Router
from appliance.settings import Settings
from appliance.supervisor.inventory import detect_inventory
from appliance.supervisor.supervisor import Supervisor

log = logging.getLogger("appliance")


class Appliance:
    """Everything behind the HTTP edge."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = load_catalogue_file(settings.config_path)
        self.engines = EngineFactory(
            base_dir=settings.config_path.resolve().parent,
            cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        )
        for spec in config.models:
            self.engines.validate(spec)
        self.inventory = detect_inventory(settings.cpu_memory_budget_gib)
        self.catalogue = Catalogue(config.models, CatalogueOrigin.FILE)
        self.metrics = Metrics(
            catalogue=self.catalogue,
            registry_status=self.registry_status,
            remote_status=self.remote_up,
        )
        self.supervisor = Supervisor(
            self.inventory, self.engines, limits=settings.limits, observer=self.metrics
        )
        self.metrics.bind(supervisor=self.supervisor)
        self.remotes = RemoteBackends(settings.remote)
        self.router = Router(self.catalogue, self.supervisor, remote=self.remotes.get)

    async def start(self) -> None:
        """Load the autoload models (returns when each is ready or failed)."""
        log.info(
            "devices: %s",
            ", ".join(
                f"{d.kind.value}{d.index} {d.total_gib:.1f} GiB" for d in self.inventory.devices
            ),
        )
        await self.remotes.sync(self.catalogue.specs())
        await self.remotes.start()
        await self.supervisor.start(self.catalogue.specs())

    async def stop(self) -> None:
        """Drain and stop every engine."""
        await self.supervisor.shutdown()
        await self.remotes.close()

    async def load(self, name: str) -> list[str]:
        """Load ``name``; return the models evicted to make room."""
        before = {h.name for h in self.supervisor.handles() if h.state.value == "ready"}
        await self.supervisor.load(name)
        after = {h.name for h in self.supervisor.handles() if h.state.value == "ready"}
        return sorted(before - after - {name})

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the catalogue file and apply only the difference."""
        config = load_catalogue_file(self.settings.config_path)
        for spec in config.models:
            self.engines.validate(spec)
        changes = await self.supervisor.apply_catalogue(config.models)
        await self.remotes.sync(config.models)
        self.catalogue.replace(config.models, CatalogueOrigin.FILE)
        log.info("catalogue reloaded", extra={"event": "reload", **changes})
        return changes

    def remote_status(self, spec: ModelSpec) -> dict[str, Any]:
        """State of a remote model's backend: `ready` while it answers, else `unavailable`."""
        status = dict(self.remotes.status().get(spec.name, {}))
        status["state"] = "ready" if status.get("up", True) else "unavailable"
        return status

    def remote_up(self) -> dict[str, bool]:
        """Each remote model's backend: up or not."""
        return self.remotes.up()

    def registry_status(self) -> dict[str, Any]:
        """Whether a registry is configured and up, and the catalogue source."""
        return {"configured": False, "source": self.catalogue.origin.value}
