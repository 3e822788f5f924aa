"""The keys file and the key environment variables, read into an ``AuthConfig``.

Keys come from a YAML file (``--api-keys FILE``) and/or the ``APPLIANCE_API_KEYS`` and
``APPLIANCE_ADMIN_KEYS`` environment variables; ``appliance.api.auth`` enforces them. A
problem is reported by the key's name and field, never by the key text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from appliance.admin_key import ensure_admin_key
from appliance.api_keys import KEY_MIN_LENGTH, NAME_PATTERN, ApiKey, AuthConfig, Role
from appliance.config_problems import describe, locate
from appliance.errors import ConfigError

log = logging.getLogger("appliance.auth")

KEY_FILE_MIN_LENGTH = 32
"""Shortest key the keys file and the environment may give: 32 characters hold 128 bits or
more however they are made (hex at 4 bits each), out of reach of guessing over the LAN."""

USER_KEYS_ENV = "APPLIANCE_API_KEYS"
ADMIN_KEYS_ENV = "APPLIANCE_ADMIN_KEYS"


def describe_open(config: AuthConfig) -> str | None:
    """The warning to log at start when something answers without a key, else None."""
    if config.anonymous:
        return (
            "anonymous access is on: /v1 is open to anyone who can reach this port, with no "
            "key and no per-key limits; the admin API still needs an admin key off loopback"
        )
    if config.keys:
        return None
    return (
        "no API keys configured: /v1 and the admin API answer only on loopback (this "
        "machine); to serve the LAN set keys (--api-keys FILE, "
        f"{USER_KEYS_ENV} / {ADMIN_KEYS_ENV}) or open /v1 with --allow-anonymous"
    )


def load_auth_config(path: Path | None, env: Mapping[str, str]) -> AuthConfig:
    """Read the keys from the YAML file at ``path`` (if any) and the environment.

    Keys from ``APPLIANCE_API_KEYS`` (role user) and ``APPLIANCE_ADMIN_KEYS`` (role admin),
    comma-separated, are added to the file's and named ``env-user-1``, ``env-admin-1``, ...
    Raises ``ConfigError`` naming the key's name and field, never the key text.
    """
    raw: dict[str, Any] = {}
    origin = "api keys"
    if path is not None:
        origin = str(path)
        raw = _read_file(path)
    keys = raw.get("keys")
    if keys is None:
        keys = []
    if not isinstance(keys, list):
        raise ConfigError(f"{origin}: 'keys' must be a list")
    for variable, role in ((USER_KEYS_ENV, Role.USER), (ADMIN_KEYS_ENV, Role.ADMIN)):
        given = [part.strip() for part in env.get(variable, "").split(",")]
        for number, key in enumerate((k for k in given if k), start=1):
            keys.append({"key": key, "name": f"env-{role.value}-{number}", "role": role.value})
    raw["keys"] = keys
    try:
        config = AuthConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, keys) for error in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None
    weak = [k.name for k in config.keys if len(k.key.get_secret_value()) < KEY_FILE_MIN_LENGTH]
    if weak:
        raise ConfigError(
            f"{origin}: "
            + "; ".join(f"key {name!r}: field 'key'" for name in weak)
            + f": fewer than {KEY_FILE_MIN_LENGTH} characters; use random keys of 128 bits or "
            "more (python -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))')"
        )
    return config


def with_generated_admin_key(config: AuthConfig, path: Path) -> AuthConfig:
    """``config`` plus the admin key kept in ``path`` (made there if missing), named
    ``generated-admin``; its path is logged, never the key."""
    key = ensure_admin_key(path)
    log.info("admin key file: %s", path, extra={"event": "admin_key_file"})
    generated = ApiKey(key=SecretStr(key), name="generated-admin", role=Role.ADMIN)
    return AuthConfig.model_validate({**config.model_dump(), "keys": [*config.keys, generated]})


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file: {exc.strerror}") from None
    if mode & 0o077:
        log.warning(
            "API key file %s can be read by other users (mode %o); chmod 600 it",
            path,
            mode & 0o777,
            extra={"event": "api_keys_file_mode"},
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the position: PyYAML's own message quotes the offending line, maybe a key.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'keys' list at the top")
    return raw


def _describe(error: Mapping[str, Any], keys: list[Any]) -> str:
    """One validation problem as text; never quotes the input, which may be a key."""
    # A name that is itself invalid may be a pasted key; it is named by its position instead.
    where, loc = locate(
        error, "keys", keys, "key", name_ok=lambda name: bool(NAME_PATTERN.match(name))
    )
    field = ".".join(str(part) for part in loc)
    if error.get("type") == "too_short" and field == "key":
        # Pydantic counts "items" for a secret; say characters, and not how many were given.
        return f"{where}: field 'key': must be at least {KEY_MIN_LENGTH} characters long"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not field and message.startswith("key "):
        return message  # our own cross-key check, which names the keys itself
    return describe(error, where, loc, show_input=False)
