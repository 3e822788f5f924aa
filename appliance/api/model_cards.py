"""What ``vllm serve``'s ``/v1/models`` says of a model, for the appliance's ``/v1/models``."""

from __future__ import annotations

import os
from typing import Any

from appliance.engines.base import Engine, model_card_of

VLLM_CARD_FIELDS = ("root", "parent", "max_model_len")


def vllm_card_fields(engine: Engine | None, *, admin: bool) -> dict[str, Any]:
    """vLLM's ``root``, ``parent`` and ``max_model_len`` for a model whose engine runs.

    vLLM's ``root`` is the folder or hub id the weights came from; a local folder is shown to
    admins only (where files live on the box is the operator's business), others see the
    model's name there.
    """
    card = model_card_of(engine)
    if not card:
        return {}
    fields = {key: card.get(key) for key in VLLM_CARD_FIELDS}
    root = fields.get("root")
    if not admin and isinstance(root, str) and os.path.isabs(root):
        fields["root"] = card.get("id")
    return fields
