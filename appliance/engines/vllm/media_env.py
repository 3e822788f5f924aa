"""vLLM's media switches from the environment, checked once at start.

``VLLM_VIDEO_LOADER_BACKEND`` names the video decoder of every request with a video
(``vllm/multimodal/media/video.py``: ``VIDEO_LOADER_REGISTRY.load(name)``). vLLM reads it only
then, so a name it has no decoder for fails each such request (an ``AssertionError``, a 500),
not the start; and a GPU decoder runs in the process that decodes, the appliance's front-end
processes, putting a CUDA context on the first GPU outside placement (as the ``engine:``
settings ``catalogue.schema`` refuses for the same reason). Both are refused at start.
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.errors import ConfigError

VIDEO_BACKEND_ENV = "VLLM_VIDEO_LOADER_BACKEND"


def check_video_loader_backend(environ: Mapping[str, str]) -> None:
    """Raise ``ConfigError`` (one line) if ``environ`` names a video backend vLLM does not
    have, or one that decodes on the GPU. Imports vLLM's video module only when it is set."""
    name = environ.get(VIDEO_BACKEND_ENV)
    if name is None:
        return
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # plugins may register backends of their own, as vLLM allows
    known = sorted(VIDEO_LOADER_REGISTRY.name2class)
    if name not in VIDEO_LOADER_REGISTRY.name2class:
        raise ConfigError(
            f"{VIDEO_BACKEND_ENV}={name!r} names no video backend of this vLLM (it has "
            f"{', '.join(known)}): every request with a video would fail; unset it or name one"
        )
    if VIDEO_LOADER_REGISTRY.backend_requires_gpu(name):
        raise ConfigError(
            f"{VIDEO_BACKEND_ENV}={name} decodes on the GPU in the appliance's front-end "
            "processes (a CUDA context on the first GPU, outside placement); decode on the CPU: "
            "unset it or name a CPU backend"
        )
