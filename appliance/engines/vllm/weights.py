"""A model's weight files: fetched before the engine starts, and measured."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("appliance.engine")


def download_weights(args: argparse.Namespace, model: str) -> str | None:
    """Fetch a hub model's weights before the engine starts, with vLLM's own patterns; the
    folder they are in, or None when left to vLLM.

    vLLM's engine core downloads them itself otherwise, inside its engine-ready timeout
    (VLLM_ENGINE_READY_TIMEOUT_S, 600 s), which a big model on a slow link exceeds. A
    local folder, an offline hub and load formats other than safetensors/bin are left to
    vLLM.
    """
    import huggingface_hub

    source = str(args.model)
    if os.path.isdir(source) or huggingface_hub.constants.HF_HUB_OFFLINE:
        return None
    if getattr(args, "load_format", "auto") not in ("auto", "safetensors", "pt"):
        return None
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

    log.info("downloading weights", extra={"model": model, "source": source})
    folder: str = download_weights_from_hf(
        source,
        cache_dir=getattr(args, "download_dir", None),
        allow_patterns=["*.safetensors", "*.bin", "*.pt"],
        revision=getattr(args, "revision", None),
    )
    return folder


def weights_size_gib(folder: str) -> float | None:
    """GiB of weight files in ``folder``; None when it is not a folder or holds none."""
    if not os.path.isdir(folder):
        return None
    total = 0
    for entry in os.scandir(folder):
        if entry.name.endswith((".safetensors", ".bin", ".pt")) and entry.is_file():
            total += entry.stat().st_size
    return total / 2**30 if total else None
