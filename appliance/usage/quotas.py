"""Token quotas per key and per UTC day or month: the file, the windows, the verdict.

A key's request is refused (429) once the tokens it used in the current window reach its
quota, or would pass it with the most the request may generate (``n x max_tokens`` for each
of its prompts, checked before it runs); its prompt tokens are known only after it ran, so the
request that crosses the line by them is served whole, and every later one waits for the
window to reset, at 00:00 UTC (day) or on the 1st (month).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.config_problems import describe
from appliance.errors import ConfigError


class Period(str, enum.Enum):
    """The window a quota counts over."""

    DAY = "day"  # one UTC calendar day
    MONTH = "month"  # one UTC calendar month


class TokenQuota(BaseModel):
    """One key's token allowance (prompt plus generated tokens)."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_day: int | None = Field(None, ge=1)
    tokens_per_month: int | None = Field(None, ge=1)

    def limits(self) -> list[tuple[Period, int]]:
        """The quota's limits, day first."""
        found = []
        if self.tokens_per_day is not None:
            found.append((Period.DAY, self.tokens_per_day))
        if self.tokens_per_month is not None:
            found.append((Period.MONTH, self.tokens_per_month))
        return found


class QuotaConfig(BaseModel):
    """Quotas by key name (names from the API keys)."""

    model_config = ConfigDict(extra="forbid")

    quotas: dict[str, TokenQuota] = Field(default_factory=dict)

    def check_names(self, key_names: Iterable[str]) -> None:
        """Raise ``ConfigError`` for a quota whose key is not configured."""
        known = set(key_names)
        unknown = sorted(set(self.quotas) - known)
        if unknown and not known:
            raise ConfigError("token quotas need API keys (--api-keys); none are configured")
        if unknown:
            raise ConfigError(
                f"quota for key {unknown[0]!r}: no API key has that name "
                f"(known: {', '.join(sorted(known))})"
            )


def load_quotas(path: Path | None) -> QuotaConfig:
    """Read the quota file (``quotas: {NAME: {tokens_per_day, tokens_per_month}}``)."""
    if path is None:
        return QuotaConfig()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the quota file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return QuotaConfig.model_validate(raw or {})
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None


def _describe(error: Mapping[str, Any]) -> str:
    """One problem as text, named by its key: "quota 'alice': field 'tokens_per_day': ..."."""
    loc = list(error.get("loc", ()))
    if len(loc) >= 2 and loc[0] == "quotas":
        return describe(error, f"quota {loc[1]!r}", loc[2:], show_input=True)
    return describe(error, "top level", loc, show_input=True)


def window_start(period: Period, day: date) -> date:
    """The first day of the window of ``period`` that holds ``day``."""
    return day if period is Period.DAY else day.replace(day=1)


def window_end(period: Period, day: date) -> datetime:
    """When the window of ``period`` that holds ``day`` resets (UTC)."""
    if period is Period.DAY:
        nxt = day + timedelta(days=1)
    else:
        nxt = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return datetime(nxt.year, nxt.month, nxt.day, tzinfo=timezone.utc)
