"""Reading ``models.yaml``: YAML in, a validated ``CatalogueFile`` out, or one clear message.

A wrong file must fail at start with a message naming the model, the field and what is wrong,
never a traceback; ``ConfigError`` carries that message up to the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from appliance.catalogue.schema import CatalogueFile
from appliance.errors import ConfigError


def _describe(error: dict[str, Any], raw: Any) -> str:
    loc = list(error.get("loc", ()))
    where = "top level"
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        entry = raw.get("models", [])[index] if isinstance(raw, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"model {name!r}" if isinstance(name, str) else f"model #{index + 1}"
        loc = loc[2:]
    loc = [part for part in loc if not str(part).startswith("function-after")]
    field = ".".join(str(part) for part in loc)
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{where}: unknown field {field!r}"
    if kind == "missing":
        return f"{where}: field {field!r} is required"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    value = error.get("input")
    got = ""
    if kind != "model_type" and not isinstance(value, (dict, list)) and field:
        got = f" (got {value!r})"
    return f"{where}: field {field!r}: {message}{got}" if field else f"{where}: {message}"


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
