"""Shared, slow fixtures: real appliances with real vLLM engines, and vLLM's own servers as
the reference.

The session-wide ones (the shared appliance and its references) serve only the modules listed
in ``tests/conftest.py``'s ``SHARED_MODULES``, which run one after another in one process;
they are stopped as soon as the last of those has run (``stop_when_the_shared_modules_end``),
so their engines do not hold memory while the rest of the suite runs beside them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import stop_when_the_shared_modules_end
from tests.integration.harness import (
    MODELS_DIR,
    START_DEADLINE,
    ApplianceProcess,
    minilm,
    wait_until_ok,
)
from tests.integration.vllm_reference import (
    CHAT_MODEL,
    EMBED_FLAGS,
    EMBED_MODEL,
    VLLMServer,
    chat_flags,
    minilm_folder,
    reference_chat,
    write_template,
)


@pytest.fixture(scope="session")
def serving_appliance(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApplianceProcess]:
    """The default shape of models.yaml: a tiny chat model and MiniLM, both autoloaded; the
    chat model with the settings vLLM's reference server gets (tool calling, a template file,
    structured outputs), so the differential tests run here too."""
    workdir = tmp_path_factory.mktemp("serving")
    write_template(workdir)
    # Two HTTP workers (issue 16): every module on this appliance runs across both.
    appliance = ApplianceProcess(workdir, [reference_chat(), minilm()]).start("--workers", "2")
    stop_when_the_shared_modules_end(request.config, appliance.stop)
    yield appliance
    appliance.stop()


def chat_reference(workdir: Path) -> Iterator[str]:
    """``vllm serve`` of the shared appliance's chat model (the tiny Llama), started in
    ``workdir``: its base URL while it runs."""
    template = write_template(workdir)
    server = VLLMServer.start(
        workdir, CHAT_MODEL, str(MODELS_DIR / "tiny-llama"), *chat_flags(template)
    )
    try:
        wait_until_ok(f"{server.url}/health", server.proc, server.log, START_DEADLINE)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_chat_reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The shared modules' ``vllm serve`` of the chat model: its base URL."""
    running = chat_reference(tmp_path_factory.mktemp("vllm-chat-reference"))
    url = next(running)
    stop_when_the_shared_modules_end(request.config, running.close)
    yield url
    running.close()


@pytest.fixture(scope="module")
def module_chat_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``vllm serve`` of the chat model for one module outside the shared ones (federation,
    Ray): it runs in whichever process runs that module, and only while it does."""
    yield from chat_reference(tmp_path_factory.mktemp("vllm-chat-reference"))


@pytest.fixture(scope="session")
def vllm_embed_reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``vllm serve`` of the shared appliance's embedding model (MiniLM): its base URL."""
    workdir = tmp_path_factory.mktemp("vllm-embed-reference")
    server = VLLMServer.start(workdir, EMBED_MODEL, minilm_folder(), *EMBED_FLAGS)
    try:
        wait_until_ok(f"{server.url}/health", server.proc, server.log, START_DEADLINE)
        stop_when_the_shared_modules_end(request.config, server.stop)
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_reference(vllm_chat_reference: str, vllm_embed_reference: str) -> dict[str, str]:
    """``vllm serve`` of each of the shared appliance's models, by name -> base URL."""
    return {CHAT_MODEL: vllm_chat_reference, EMBED_MODEL: vllm_embed_reference}


@pytest.fixture(scope="session")
def client(serving_appliance: ApplianceProcess) -> OpenAI:
    """The OpenAI SDK pointed at the shared appliance."""
    return OpenAI(base_url=f"{serving_appliance.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch folder for one test's appliance."""
    return tmp_path
