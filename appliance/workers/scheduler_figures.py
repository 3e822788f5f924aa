"""The KV-cache and waiting gauges with HTTP workers: each worker's latest scheduler figures,
sent to the owner, which shows the freshest client's.

vLLM gives each engine step's ``SchedulerStats`` to one client only, the first with outputs
in that step (``Scheduler.update_from_output``: "Return stats to only one of the
front-ends"). With ``--workers`` > 1 the step that matters may have gone to a worker; the
owner's own client then holds an older snapshot, or none. So every worker sends, with its
request figures, the snapshot of each engine it is a client of when a newer one came
(``UnsentSnapshots``), and the owner keeps the freshest per engine (``PeerSnapshots``). Before
a ``/metrics`` scrape the owner asks every worker to flush, so the scrape sees the latest.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from appliance.engines.base import Engine, SchedulerSnapshot

# What a worker knows: entry name -> (the owner's id of the engine link, the latest snapshot).
SnapshotsByEntry = Mapping[str, tuple[str, SchedulerSnapshot]]


class UnsentSnapshots:
    """The worker's side: of its clients' latest snapshots, those not sent yet."""

    def __init__(self, latest: Callable[[], SnapshotsByEntry]) -> None:
        self._latest = latest
        self._sent: dict[str, float] = {}  # link id -> ``at`` of the snapshot last sent

    def take(self) -> dict[str, dict[str, Any]]:
        """The newer snapshots, on the control channel's wire (``observe``'s ``schedulers``),
        marked sent."""
        wire: dict[str, dict[str, Any]] = {}
        latest = self._latest()
        for entry, (link_id, snapshot) in latest.items():
            if self._sent.get(link_id) == snapshot.at:
                continue
            self._sent[link_id] = snapshot.at
            wire[entry] = {
                "link_id": link_id,
                "waiting": snapshot.waiting,
                "kv_cache_usage": snapshot.kv_cache_usage,
                "at": snapshot.at,
            }
        # Forget the links of closed clients (a reloaded model gets a new link).
        live = {link_id for link_id, _ in latest.values()}
        for gone in set(self._sent) - live:
            del self._sent[gone]
        return wire


def snapshot_from(sent: Mapping[str, Any]) -> SchedulerSnapshot | None:
    """A worker's snapshot off the wire; None if it does not read as one."""
    try:
        snapshot = SchedulerSnapshot(
            waiting=int(sent["waiting"]),
            kv_cache_usage=float(sent["kv_cache_usage"]),
            at=float(sent["at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    usable = snapshot.waiting >= 0 and math.isfinite(snapshot.at)
    return snapshot if usable and 0.0 <= snapshot.kv_cache_usage <= 1.0 else None


class PeerSnapshots:
    """The owner's side: the freshest snapshot workers sent of each engine.

    Kept by engine object (weakly): a restarted or reloaded model has a new engine, and the
    figures of the old one must not stand for it.
    """

    def __init__(self) -> None:
        self._by_engine: weakref.WeakKeyDictionary[Any, SchedulerSnapshot] = (
            weakref.WeakKeyDictionary()
        )

    def offer(self, engine: Engine, snapshot: SchedulerSnapshot) -> None:
        """Keep ``snapshot`` of ``engine`` if it is fresher than the one kept."""
        kept = self._by_engine.get(engine)
        if kept is None or snapshot.at > kept.at:
            self._by_engine[engine] = snapshot

    def latest(self, engine: Engine | None) -> SchedulerSnapshot | None:
        """The freshest snapshot a worker sent of ``engine``; None if none did."""
        return self._by_engine.get(engine) if engine is not None else None
