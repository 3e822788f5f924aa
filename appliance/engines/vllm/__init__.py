"""The local engine: in-process vLLM ``AsyncLLM`` clients and vLLM's own OpenAI serving layer.

This is the only package that imports vLLM. Its module paths move between vLLM releases (the
project pins one version), so every such import lives here and nowhere else; each is made
where it is used, inside a function, so that importing this package does not import vLLM.

- ``engine``: ``VLLMEngine``, the appliance's engine interface over one model, and
  ``attach_engine`` for a client of cores another process started;
- ``args``: a catalogue entry as vLLM's serve arguments, validated by vLLM's parser;
- ``spawn``: the spawn method and the per-engine environment window;
- ``cores``: engine cores shared by several client processes, their link and watch;
- ``client``: vLLM's ``AsyncLLM`` client, built alike by an owner and an attached client;
- ``stats``: vLLM's stat logger, adapted to the appliance's figures;
- ``lora``: adapter ids every client derives alike;
- ``serving``: vLLM's app, request models and replies for one engine;
- ``weights``: weight files fetched before the engine starts, and measured;
- ``runtime``: the installed vLLM (build, version) and its modules imported ahead.
"""

from appliance.engines.vllm.args import EngineArgsBuilder
from appliance.engines.vllm.engine import VLLMEngine, attach_engine
from appliance.engines.vllm.runtime import import_client_modules, vllm_build, vllm_version
from appliance.engines.vllm.spawn import (
    MULTIPROC_METHOD,
    cpu_compile_environment,
    prepare_process_environment,
)

__all__ = [
    "MULTIPROC_METHOD",
    "EngineArgsBuilder",
    "VLLMEngine",
    "attach_engine",
    "cpu_compile_environment",
    "import_client_modules",
    "prepare_process_environment",
    "vllm_build",
    "vllm_version",
]
