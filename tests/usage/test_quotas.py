"""Quota files and windows."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.usage.quotas import Period, QuotaConfig, load_quotas, window_end, window_start


def test_windows() -> None:
    assert window_start(Period.DAY, date(2026, 11, 26)) == date(2026, 11, 26)
    assert window_start(Period.MONTH, date(2026, 11, 26)) == date(2026, 11, 1)
    utc = timezone.utc
    assert window_end(Period.DAY, date(2026, 12, 31)) == datetime(2027, 1, 1, tzinfo=utc)
    assert window_end(Period.MONTH, date(2026, 12, 31)) == datetime(2027, 1, 1, tzinfo=utc)
    assert window_end(Period.MONTH, date(2026, 1, 31)) == datetime(2026, 2, 1, tzinfo=utc)


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text("quotas:\n  alice: {tokens_per_day: 100}\n  bob: {tokens_per_month: 5}\n")
    config = load_quotas(path)
    assert config.quotas["alice"].limits() == [(Period.DAY, 100)]
    assert config.quotas["bob"].limits() == [(Period.MONTH, 5)]
    assert load_quotas(None) == QuotaConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "quotas:\n  alice: {tokens_per_dya: 1}\n",
            "quota 'alice': unknown field 'tokens_per_dya'",
        ),
        ("quotas:\n  alice: {tokens_per_day: 0}\n", "quota 'alice': field 'tokens_per_day'"),
        ("quotas: [\n", "not valid YAML"),
    ],
)
def test_load_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_quotas(path)


def test_names_must_be_configured_keys() -> None:
    config = QuotaConfig.model_validate({"quotas": {"carol": {"tokens_per_day": 1}}})
    config.check_names(["carol", "ops"])
    with pytest.raises(ConfigError, match="quota for key 'carol': no API key has that name"):
        config.check_names(["alice"])
    with pytest.raises(ConfigError, match="need API keys"):
        config.check_names([])
