"""LoRA adapters loaded at run time: one id for every client, and vLLM's errors as ours."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from typing import Any

from appliance.errors import EngineError, InvalidRequestError, ModelNotFoundError

# LoRA adapters are known to the engine core by ``lora_int_id`` alone: a second add_lora with an
# id it holds is a no-op (lora/worker_manager.py LRUCacheWorkerLoRAManager.add_adapter: "may be
# invoked multiple times for the same adapter when using multiple API servers"). Each client's
# serving layer numbers adapters with its own counter (entrypoints/openai/models/serving.py
# OpenAIServingModels.load_lora_adapter), so two clients loading at run time in different
# orders would give one id to two adapters, and one would silently serve the other's weights.
# With several clients an adapter loaded at run time therefore gets an id every client derives
# alike from its name and source. Adapters of models.yaml are loaded at start in the same order
# by every client (init_static_loras) and take counter ids 1..n, below these.
_PINNED_LORA_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "appliance_pinned_lora_id", default=None
)
SHARED_LORA_IDS = 2**30  # ids from here up to 2**31 - 1 are derived; the counter stays below


def shared_lora_id(name: str, source: str) -> int:
    """The id every client gives adapter ``name`` loaded from ``source``."""
    digest = hashlib.sha256(f"{name}\0{source}".encode()).digest()
    return SHARED_LORA_IDS + int.from_bytes(digest[:8], "big") % SHARED_LORA_IDS


@contextlib.contextmanager
def pinned_lora_id(lora_id: int | None) -> Iterator[None]:
    """Within the block (and the current task), a ``PinnableCounter`` hands out ``lora_id``."""
    token = _PINNED_LORA_ID.set(lora_id)
    try:
        yield
    finally:
        _PINNED_LORA_ID.reset(token)


class PinnableCounter:
    """vLLM's adapter-id counter, except that a load may pin the id it hands out."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def value(self) -> int:
        """The counter's value (vLLM's ``AtomicCounter.value``)."""
        return int(self._inner.value)

    def inc(self, num: int = 1) -> int:
        """The pinned id when a load pinned one, else the next counter value."""
        pinned = _PINNED_LORA_ID.get()
        return pinned if pinned is not None else int(self._inner.inc(num))

    def dec(self, num: int = 1) -> int:
        """As vLLM's ``AtomicCounter.dec``."""
        return int(self._inner.dec(num))


def raise_for_error(result: Any, what: str) -> None:
    """Raise vLLM's ``ErrorResponse`` ``result`` (if it is one) as the appliance's error."""
    error = getattr(result, "error", None)
    if error is None:
        return
    message = f"{what}: {error.message}"
    if error.code == 404:
        raise ModelNotFoundError(message, param="name")
    if error.code < 500:
        raise InvalidRequestError(message)
    raise EngineError(message)


async def load_adapter(models: Any, model: str, name: str, source: str, *, shared: bool) -> None:
    """Load the LoRA adapter at ``source`` as ``name`` into ``models`` (vLLM's
    ``OpenAIServingModels`` of ``model``), as ``/v1/load_lora_adapter`` does; ``shared``: the
    engine has several clients, so the adapter takes the id every one of them derives alike.
    """
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    with pinned_lora_id(shared_lora_id(name, source) if shared else None):
        result = await models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=source),
            base_model_name=model,
        )
    raise_for_error(result, f"model {model!r}: adapter {name!r}")


async def unload_adapter(models: Any, model: str, name: str) -> None:
    """Unload the LoRA adapter ``name`` from ``models``, as ``/v1/unload_lora_adapter`` does."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    result = await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    raise_for_error(result, f"model {model!r}: adapter {name!r}")


def served_adapters(models: Any) -> dict[str, str]:
    """The adapters ``models`` (vLLM's ``OpenAIServingModels``, or None) serves: name -> path
    or hub id."""
    if models is None:
        return {}
    return {name: lora.lora_path for name, lora in models.lora_requests.items()}
