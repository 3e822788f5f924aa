"""`appliance up --help` shows each supervisor limit with its one default."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.supervisor.handle import SupervisorLimits


def test_device_release_is_an_up_option_with_the_limits_default() -> None:
    result = CliRunner().invoke(app, ["up", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    block = text[text.index("--device-release") :]
    assert "devices stay locked" in block
    default = SupervisorLimits().device_release_seconds
    assert re.search(rf"default:\s*{default}", block[:600]), block[:600]
