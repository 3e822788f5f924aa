"""The catalogue in force: every model the appliance knows, and where that list came from."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.catalogue.registry_client import CatalogueSource
from appliance.catalogue.schema import ModelSpec
from appliance.errors import ModelNotFoundError


class Catalogue:
    """Name -> entry, replaced whole when models.yaml is reloaded or the registry changes."""

    def __init__(self, specs: Iterable[ModelSpec], origin: CatalogueSource) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self.origin = origin

    def get(self, name: str) -> ModelSpec:
        """The entry named ``name``; ``ModelNotFoundError`` (404) if there is none."""
        spec = self._specs.get(name)
        if spec is None:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist in this appliance's catalogue", param="model"
            )
        return spec

    def __contains__(self, name: object) -> bool:
        """Whether a model of that name is in the catalogue (a dict lookup)."""
        return name in self._specs

    def names(self) -> list[str]:
        """Every model name, in catalogue order."""
        return list(self._specs)

    def specs(self) -> list[ModelSpec]:
        """Every entry, in catalogue order."""
        return list(self._specs.values())

    def replace(self, specs: Iterable[ModelSpec], origin: CatalogueSource) -> None:
        """Put a new catalogue in force."""
        self._specs = {spec.name: spec for spec in specs}
        self.origin = origin
