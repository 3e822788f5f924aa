"""Reading ``models.yaml``: YAML in, a validated ``CatalogueFile`` out, or one clear message.

A wrong file must fail at start with a message naming the model, the field and what is wrong,
never a traceback; ``ConfigError`` carries that message up to the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from appliance.catalogue.schema import CatalogueFile, untagged_error
from appliance.config_problems import describe, locate
from appliance.errors import ConfigError


def _describe(error: Any, raw: Any) -> str:
    models = raw.get("models", []) if isinstance(raw, dict) else []
    error = untagged_error(error, at=2)
    where, loc = locate(error, "models", models if isinstance(models, list) else [], "model")
    return describe(error, where, loc, show_input=True)


def parse_catalogue(text: str, *, origin: str = "models.yaml") -> CatalogueFile:
    """Parse and validate the text of a ``models.yaml``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping with a 'models' list at the top")
    try:
        return CatalogueFile.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, raw) for error in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def load_catalogue_file(path: Path) -> CatalogueFile:
    """Read and validate the ``models.yaml`` at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalogue: {exc.strerror}") from None
    return parse_catalogue(text, origin=str(path))
