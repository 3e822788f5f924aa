"""The generated admin key: made by ``appliance up --generate-admin-key``, found by the CLI.

Operators expect a CLI to find its credentials by itself: ``--api-key``, else
``APPLIANCE_ADMIN_KEY``, else a file only its owner can read (``APPLIANCE_ADMIN_KEY_FILE``, by
default ``~/.config/appliance/admin-key``), which ``up`` writes the first time it generates a
key and reads on later starts. The key itself is never logged nor printed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from appliance.errors import ConfigError

ADMIN_KEY_ENV = "APPLIANCE_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "APPLIANCE_ADMIN_KEY_FILE"


def admin_key_file(env: Mapping[str, str]) -> Path:
    """Where the generated admin key lives."""
    if env.get(ADMIN_KEY_FILE_ENV):
        return Path(env[ADMIN_KEY_FILE_ENV]).expanduser()
    config_home = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(config_home) / "appliance" / "admin-key"


def ensure_admin_key(path: Path) -> str:
    """The admin key in ``path``; made (random, mode 0600) if the file does not exist yet."""
    if path.exists():
        return _read(path)
    key = "sk-admin-" + secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: never write through a file (or link) someone else put there first.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write the admin key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key


def find_admin_key(given: str | None, env: Mapping[str, str]) -> str | None:
    """The admin key the CLI sends: ``given`` (the flag), the environment, or the key file."""
    if given:
        return given
    if env.get(ADMIN_KEY_ENV):
        return env[ADMIN_KEY_ENV]
    path = admin_key_file(env)
    try:
        return _read(path) if path.exists() else None
    except ConfigError:
        return None


def _read(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"the admin key file {path} can be read by other users; chmod 600 it")
    if not key:
        raise ConfigError(f"the admin key file {path} is empty")
    return key
