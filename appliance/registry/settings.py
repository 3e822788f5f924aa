"""Settings of the registry service, and where its write token comes from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from appliance.errors import ConfigError

TOKEN_ENV_VAR = "APPLIANCE_REGISTRY_TOKEN"
TOKEN_MIN_LENGTH = 32
READ_TOKEN_ENV_VAR = "APPLIANCE_REGISTRY_READ_TOKEN"


class RegistrySettings(BaseModel):
    """Where the registry keeps its data, where it listens, and the token writes need."""

    model_config = ConfigDict(extra="forbid")

    db_path: Path = Field(Path("registry.db"), description="SQLite database file.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(8100, ge=0, le=65535, description="Port to listen on (0: any free one).")
    token: SecretStr | None = Field(
        None,
        description="Bearer token for writes; None: the service generates one at start.",
    )
    read_token: SecretStr | None = Field(
        None,
        description="Bearer token reads need (the write token works too); None: reads are open.",
    )

    allowed_hosts: list[str] | None = Field(
        None,
        description=(
            "Names and addresses a Host header may carry ('*': any); None: the names and "
            "addresses this box answers to (a DNS-rebinding page gets nothing)."
        ),
    )

    @field_validator("token", "read_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # A short token can be guessed: the registry decides what every appliance runs.
        if value is not None and len(value.get_secret_value()) < TOKEN_MIN_LENGTH:
            raise ValueError(f"must be at least {TOKEN_MIN_LENGTH} characters long")
        return value

    def generated_token_path(self) -> Path:
        """Where a generated write token is kept (beside the database, mode 0600)."""
        return self.db_path.with_name(self.db_path.name + ".token")


def resolve_read_token(token_file: Path | None, environ: Mapping[str, str]) -> SecretStr | None:
    """The read token from ``--read-token-file``, else ``APPLIANCE_REGISTRY_READ_TOKEN``, else
    None (reads open). Never from the command line itself, where other users can see it."""
    if token_file is not None:
        try:
            value = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
        if not value:
            raise ConfigError(f"the read token file {token_file} is empty")
        return SecretStr(value)
    value = environ.get(READ_TOKEN_ENV_VAR, "").strip()
    return SecretStr(value) if value else None


def resolve_token(
    token: str | None, token_file: Path | None, environ: Mapping[str, str]
) -> SecretStr | None:
    """The write token from ``--token``, else ``--token-file``, else the environment.

    Returns None when none of them gives one (the service then generates a token). Giving both
    ``--token`` and ``--token-file``, an unreadable file, or an empty token is a ``ConfigError``.
    """
    if token is not None and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            # Strip: a file written with `echo` ends in a newline that is not part of the token.
            value = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
        origin = f"token file {token_file}"
    elif token is not None:
        value, origin = token.strip(), "--token"
    elif environ.get(TOKEN_ENV_VAR) is not None:
        value, origin = environ[TOKEN_ENV_VAR].strip(), TOKEN_ENV_VAR
    else:
        return None
    if not value:
        raise ConfigError(f"the registry token from {origin} is empty")
    return SecretStr(value)
