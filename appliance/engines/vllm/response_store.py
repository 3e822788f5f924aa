"""Dropping responses from vLLM's Responses API store, which never forgets one by itself.

vLLM's serving layer keeps each stored response in three dicts by id (the response, the
messages a continuation replays, the events a background stream replays); the appliance
decides which to keep (``api.stored_responses``) and drops the rest here. Duck-typed on the
serving object, so that this module needs no vLLM import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_STORES = ("response_store", "msg_store", "event_store")


def forget_stored(serving: Any, ids: Iterable[str]) -> int:
    """Drop ``ids`` from ``serving``'s stores (vLLM's ``OpenAIServingResponses``; None: no
    Responses API); returns how many responses were there. The stores are plain dicts, only
    touched from the event loop, so no lock is needed for a ``pop``."""
    if serving is None:
        return 0
    found = 0
    for response_id in ids:
        present = False
        for name in _STORES:
            store = getattr(serving, name, None)
            if isinstance(store, dict) and store.pop(response_id, None) is not None:
                present = True
        found += present
    return found
