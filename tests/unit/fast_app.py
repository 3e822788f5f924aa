"""The settings of the whole app on test engines, as the fast HTTP tests build it: one
models.yaml, the keys given, a CPU budget the test entries fit in, any Host, no status page,
the usage database beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from appliance.api_keys import ApiKey, AuthConfig
from appliance.settings import Settings


def fast_settings(
    tmp_path: Path, models: list[dict[str, Any]], keys: list[ApiKey], **more: Any
) -> Settings:
    """Settings over ``models`` (written to ``tmp_path``/models.yaml) and ``keys``; ``more``:
    any other setting."""
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    return Settings(
        config_path=config,
        cpu_memory_budget_gib=4,
        allowed_hosts=["*"],
        auth=AuthConfig(keys=keys),
        status_page=False,
        usage_db=tmp_path / "usage.db",
        **more,
    )
