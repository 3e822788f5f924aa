"""API keys and who may do what without one: the keys file's schema (``--api-keys``).

Plain data, read by the settings; the HTTP edge (``appliance.api.auth``) enforces it.
"""

from __future__ import annotations

import enum
import hashlib
import re
from ipaddress import IPv4Network, IPv6Network

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

KEY_MIN_LENGTH = 8
PRIORITY_FIRST = -1000
"""The most urgent priority a key may have (lower is served earlier, as in vLLM)."""
PRIORITY_LAST = 1000
"""The least urgent priority: what batch lines run at, behind every online request."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@:+-]{1,64}$")


class Role(str, enum.Enum):
    """What a key may reach."""

    USER = "user"  # the OpenAI API under /v1
    ADMIN = "admin"  # /v1 and the admin API under /admin


class PublicRoute(str, enum.Enum):
    """Groups of routes that may be made reachable without a key."""

    HEALTH = "health"  # /health and /ready, for load balancers and orchestrators
    METRICS = "metrics"  # /metrics, for Prometheus
    DOCS = "docs"  # /docs, /redoc and /openapi.json


class ApiKey(BaseModel):
    """One API key and what it may do."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=KEY_MIN_LENGTH, description="The secret the client sends.")
    name: str = Field(
        pattern=NAME_PATTERN.pattern,
        description="Who the key belongs to; written in the access log instead of the key.",
    )
    role: Role = Role.USER
    models: list[str] | None = Field(None, description="Models the key may use; None: all.")
    requests_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    may_load: bool = Field(
        True, description="Whether a request with this key may start an on-demand load."
    )
    priority: int = Field(
        0,
        ge=PRIORITY_FIRST,
        le=PRIORITY_LAST,
        description="Its requests' priority (lower is served earlier, as vLLM's 'priority').",
    )
    priority_range: tuple[int, int] | None = Field(
        None,
        description=(
            "[most, least] urgent priority a request may ask for in its body's 'priority'; "
            "None: from the key's own priority down to the least urgent (a key may lower its "
            "requests, never raise them)."
        ),
    )
    weight: float = Field(
        1.0, gt=0, le=1000, description="Its share of a busy model against keys of equal priority."
    )

    def priority_bounds(self) -> tuple[int, int]:
        """The most and least urgent priority a request of this key may ask for."""
        return self.priority_range or (self.priority, PRIORITY_LAST)

    @model_validator(mode="after")
    def _priority_in_range(self) -> ApiKey:
        first, last = self.priority_bounds()
        if not PRIORITY_FIRST <= first <= last <= PRIORITY_LAST:
            raise ValueError(
                f"key {self.name!r}: field 'priority_range': must be [most, least] urgent "
                f"within [{PRIORITY_FIRST}, {PRIORITY_LAST}], most urgent first"
            )
        if not first <= self.priority <= last:
            raise ValueError(
                f"key {self.name!r}: field 'priority': {self.priority} is outside its "
                f"priority_range [{first}, {last}]"
            )
        return self

    @field_validator("key")
    @classmethod
    def _header_safe(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        # The key travels in an HTTP header, where spaces and non-ASCII cannot round-trip.
        if not (text.isascii() and text.isprintable()) or any(c.isspace() for c in text):
            raise ValueError("must be printable ASCII with no spaces")
        return value


def _default_public() -> set[PublicRoute]:
    # /metrics and the docs follow the keys like any route: the metrics name every model,
    # backend and its health, and the docs map the API.
    return {PublicRoute.HEALTH}


class AuthConfig(BaseModel):
    """The API keys, and which routes need none."""

    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)
    public: set[PublicRoute] = Field(default_factory=_default_public)
    anonymous: bool = Field(
        False,
        description="Serve /v1 (not /admin) without a key to anyone who can reach the port.",
    )
    failed_keys_free: int = Field(
        5, ge=0, description="Wrong keys a client may send before it has to wait."
    )
    failed_keys_max_wait_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest wait after wrong keys (it doubles from 1 s per further failure).",
    )
    metrics_from: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="Networks that may read /metrics without a key (a Prometheus server).",
    )

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        by_digest: dict[bytes, str] = {}
        names: set[str] = set()
        for entry in self.keys:
            if entry.name in names:
                raise ValueError(f"key {entry.name!r}: the name is used by another key too")
            names.add(entry.name)
            digest = key_digest(entry.key.get_secret_value())
            if digest in by_digest:
                raise ValueError(
                    f"key {entry.name!r}: field 'key': same key as {by_digest[digest]!r}"
                )
            by_digest[digest] = entry.name
        return self

    def rate_windows(self) -> list[int]:
        """Each key's requests-per-minute window size on a lending board (0: no rate
        limit), in the keys file's order; every HTTP process lays its board out by it."""
        return [key.requests_per_minute or 0 for key in self.keys]


def key_digest(key: str) -> bytes:
    """What is kept of a key to recognise it: its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).digest()
