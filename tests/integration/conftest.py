"""Shared, slow fixtures: real appliances with real vLLM engines (one start per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.harness import ApplianceProcess, minilm, tiny_chat


@pytest.fixture(scope="session")
def serving_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """The default shape of models.yaml: a tiny chat model and MiniLM, both autoloaded."""
    # Two HTTP workers (issue 16): every module on this appliance runs across both.
    appliance = ApplianceProcess(tmp_path_factory.mktemp("serving"), [tiny_chat(), minilm()]).start(
        "--workers", "2"
    )
    yield appliance
    appliance.stop()


@pytest.fixture(scope="session")
def client(serving_appliance: ApplianceProcess) -> OpenAI:
    """The OpenAI SDK pointed at the shared appliance."""
    return OpenAI(base_url=f"{serving_appliance.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch folder for one test's appliance."""
    return tmp_path
