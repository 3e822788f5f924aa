"""vLLM variables the appliance refuses, and the ones it sets, before any engine starts.

vLLM reads its switches from the environment (``vllm/envs.py``), lazily, at each use. A few of
them turn a client's request into something more than a request, so the appliance refuses to
start with them, or sets them itself:

- ``VLLM_ALLOW_INSECURE_SERIALIZATION`` makes vLLM's msgpack decoder ``pickle.loads`` parts
  of what it decodes (``v1/serial_utils.py``), among them ``/inference/v1/generate``'s
  ``features``: code execution for any key. Refused, in the environment and in an engine's.
- ``VLLM_MEDIA_URL_ALLOW_REDIRECTS`` (on by vLLM's default) lets a media URL that passed the
  appliance's address check redirect the fetch to an internal address: set to 0.
- ``VLLM_RPC_BASE_PATH`` is where vLLM puts its ZMQ IPC sockets (``/tmp`` by default, with
  the umask's permissions): set to the appliance's own 0700 runtime directory.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path

from appliance.errors import ConfigError

REFUSED = {
    "VLLM_ALLOW_INSECURE_SERIALIZATION": (
        "lets vLLM unpickle parts of client requests (code execution for any API key)"
    ),
}
"""Variables the appliance will not start with (set to anything but 0), and why."""


def refuse_unsafe_environment(
    environ: Mapping[str, str], *, where: str = "the environment"
) -> None:
    """Raise ``ConfigError`` (one line, naming the variable) if ``environ`` sets a variable
    of ``REFUSED``; ``where`` says whose environment it is (an engine's, say)."""
    for name, why in REFUSED.items():
        value = environ.get(name)
        if value is not None and value.strip() not in ("", "0"):
            raise ConfigError(f"{name}={value} is set in {where}: it {why}; unset it")


def harden_environment(environ: MutableMapping[str, str], runtime_dir: Path | None) -> None:
    """Refuse what ``refuse_unsafe_environment`` refuses, then set what vLLM must read:
    media fetches follow no redirects, and IPC sockets go in ``runtime_dir`` (if given)."""
    refuse_unsafe_environment(environ)
    environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
    if runtime_dir is not None:
        environ["VLLM_RPC_BASE_PATH"] = str(runtime_dir)
