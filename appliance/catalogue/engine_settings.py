"""The rules an entry's ``engine:`` settings (vLLM's own ``vllm serve`` options) must keep.

vLLM's argument parser checks the values (``appliance.engines.vllm.args``); this module refuses
the settings the appliance sets itself, those that would escape placement, and those of
``vllm serve``'s own HTTP server, each with what to use instead.
"""

from __future__ import annotations

from typing import Any

# Engine settings the appliance derives from the entry itself; setting them in ``engine:``
# would silently override placement (vLLM would take more memory, or other GPUs, than placed).
RESERVED_ENGINE_KEYS: dict[str, str] = {
    "model": "is set by the appliance from source",
    "served_model_name": "is set by the appliance from name",
    "tensor_parallel_size": "is set by the appliance from resources.tensor_parallel_size",
    "runner": "is set by the appliance from task",
    "gpu_memory_utilization": (
        "is set by placement from resources.memory_gib or resources.memory_share"
    ),
    "kv_cache_memory_bytes": (
        "would size the KV cache outside placement's budget; give resources.memory_gib instead"
    ),
    "device_ids": "is set by placement; pin GPUs with resources.devices",
    "num_gpu_blocks_override": (
        "would size the KV cache by block count, past placement's memory budget; give "
        "resources.memory_gib instead"
    ),
}
# vLLM's GPU video decoder (vllm/multimodal/video_decoders: requires_gpu=True).
_GPU_VIDEO_BACKENDS = frozenset({"pynvvideocodec"})
# Engine settings that would make vLLM use more GPUs than placement gives it; 1 is allowed.
SINGLE_ENGINE_KEYS: dict[str, str] = {
    "pipeline_parallel_size": (
        "placement gives an engine resources.tensor_parallel_size GPUs; use tensor parallelism"
    ),
    "data_parallel_size": "run several entries (or replicas behind a backend_url) instead",
    "data_parallel_size_local": "run several entries (or replicas behind a backend_url) instead",
    "decode_context_parallel_size": "placement does not account for context parallelism",
    "prefill_context_parallel_size": "placement does not account for context parallelism",
}

# `vllm serve` settings of its own HTTP server (FrontendArgs in vLLM's cli_args.py), which the
# appliance's one server replaces: accepted, they would be silently ignored. Each names the
# appliance's option for the same thing.
SERVER_ONLY_ENGINE_KEYS: dict[str, str] = {
    "host": "use `appliance up --host`",
    "port": "use `appliance up --port`",
    "uds": "the appliance listens on TCP (`appliance up --host/--port`)",
    "grpc_port": "the appliance serves HTTP only",
    "api_key": "use API keys (`appliance up --api-keys FILE`, APPLIANCE_API_KEYS)",
    "allowed_origins": "use `appliance up --cors-origin`",
    "allow_credentials": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "allowed_methods": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "allowed_headers": "use `appliance up --cors-origin` (CORS is the appliance's)",
    "ssl_keyfile": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_certfile": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_ca_certs": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_cert_reqs": "terminate TLS in a reverse proxy in front of the appliance",
    "ssl_ciphers": "terminate TLS in a reverse proxy in front of the appliance",
    "enable_ssl_refresh": "terminate TLS in a reverse proxy in front of the appliance",
    "root_path": "the appliance's routes are at the root; a proxy may strip a prefix",
    "middleware": "the appliance's middleware is fixed (keys, limits, request ids, logs)",
    "uvicorn_log_level": "use `appliance up --log-level`",
    "disable_uvicorn_access_log": "the appliance writes its own access log",
    "disable_access_log_for_endpoints": "the appliance writes its own access log",
    "enable_request_id_headers": "the appliance always returns X-Request-Id",
    "disable_fastapi_docs": "the appliance's /docs follow its keys file (public: [docs])",
    "enable_offline_docs": "the appliance's /docs are its own",
    "enable_server_load_tracking": "the appliance's /metrics count requests in flight",
    "data_parallel_supervisor_port": "the appliance runs one engine per entry",
    "dp_supervisor_probe_interval_s": "the appliance runs one engine per entry",
    "dp_supervisor_probe_timeout_s": "the appliance runs one engine per entry",
    "dp_supervisor_probe_failure_threshold": "the appliance runs one engine per entry",
}


def _check_frontend_gpu(keys: dict[str, Any]) -> None:
    """Refuse multimodal work on the GPU in the front-end processes.

    vLLM runs GPU video decoding and device-side multimodal processing in every API process
    (``mm_ipc_gpu_memory_gb``, ``vllm/multimodal/gpu_ipc_memory.py``): here that is the
    appliance's own process and its HTTP workers, which have every GPU visible, so each
    would make a CUDA context on the first GPU, outside placement.
    """
    why = (
        "would run GPU multimodal work in the appliance's front-end processes (a CUDA "
        "context on the first GPU, outside placement); decode on the CPU"
    )
    if float(keys.get("mm_ipc_gpu_memory_gb") or 0) > 0:
        raise ValueError(f"engine setting 'mm_ipc_gpu_memory_gb' {why}")
    if str(keys.get("mm_processor_device") or "auto") not in ("auto", "cpu"):
        raise ValueError(f"engine setting 'mm_processor_device' {why}")
    processor = keys.get("mm_processor_kwargs") or {}
    if isinstance(processor, dict) and str(processor.get("device", "cpu")).split(":")[0] not in (
        "cpu",
    ):
        raise ValueError(f"engine setting 'mm_processor_kwargs.device' {why}")
    video = (keys.get("media_io_kwargs") or {}).get("video", {})
    if isinstance(video, dict):
        gpu_backend = {video.get("backend"), video.get("video_backend")} & _GPU_VIDEO_BACKENDS
        on_cuda = str(video.get("device", "cpu")).startswith("cuda")
        if gpu_backend or on_cuda:
            raise ValueError(f"engine setting 'media_io_kwargs.video' {why}")


def check_server_only_keys(keys: dict[str, Any]) -> None:
    """Refuse ``vllm serve`` HTTP-server settings in ``engine:``, naming the appliance's own."""
    for key, instead in SERVER_ONLY_ENGINE_KEYS.items():
        if key in keys:
            raise ValueError(
                f"engine setting {key!r} is a setting of vllm serve's own HTTP server, which "
                f"the appliance replaces: {instead}"
            )


def check_engine_keys(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (an entry's ``engine:``) if it keeps the rules above; ``ValueError`` naming the
    first setting that does not, and what to use instead."""
    keys = {k.replace("-", "_"): v for k, v in value.items()}
    for key, why in RESERVED_ENGINE_KEYS.items():
        if key in keys:
            raise ValueError(f"engine setting {key!r} {why}; remove it from engine")
    check_server_only_keys(keys)
    for key, why in SINGLE_ENGINE_KEYS.items():
        if key in keys and keys[key] not in (None, 1, "1"):
            raise ValueError(f"engine setting {key!r} is not supported: {why}")
    _check_frontend_gpu(keys)
    backend = keys.get("distributed_executor_backend")
    if backend is not None and backend not in ("mp", "uni"):
        raise ValueError(
            f"engine setting distributed_executor_backend={backend!r} is not supported: "
            "with it the engine chooses its GPUs itself (Ray placement groups) and the "
            "appliance's placement cannot account for them; use 'mp' (the default), or "
            "serve such a model with its own `vllm serve` and name it by backend_url"
        )
    return value
