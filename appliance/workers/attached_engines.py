"""This worker's clients of the owner's engines: attached once per engine, on first need
(or ahead of it), with the owner's adapters loaded into each."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import pickle
import time
from collections import defaultdict
from typing import Any, Protocol

from appliance.engines.base import Engine, EngineLink, SchedulerSnapshot, TakesAdapters
from appliance.errors import ApplianceError

log = logging.getLogger("appliance")


class EngineAttacher(Protocol):
    """Makes this process a client of an engine another process started."""

    def attach(self, link: EngineLink, client_index: int) -> Engine:
        """A new, not yet started, client ``client_index`` of the engine ``link`` names."""
        ...


class LinkMissing(Exception):
    """The owner did not send a link this worker no longer has (closed meanwhile)."""


class AttachedEngines:
    """This worker's clients of the owner's engines, made on first use, one per engine."""

    def __init__(self, attacher: EngineAttacher, index: int) -> None:
        self._attacher = attacher
        self._index = index
        self._engines: dict[str, Engine] = {}
        self._entry_of: dict[str, str] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ahead: set[asyncio.Task[Engine]] = set()

    def held(self) -> list[str]:
        """The link ids this worker has a client of (the owner need not send them again)."""
        return list(self._engines)

    def scheduler_snapshots(self) -> dict[str, tuple[str, SchedulerSnapshot]]:
        """Each attached client's latest scheduler figures, by entry, with the link id."""
        found = {}
        for link_id, engine in self._engines.items():
            snapshot = engine.stats().scheduler
            if snapshot is not None:
                found[self._entry_of[link_id]] = (link_id, snapshot)
        return found

    def attached(self, link_id: str) -> Engine | None:
        """The client of ``link_id`` if this worker has one."""
        return self._engines.get(link_id)

    async def get(
        self, entry: str, link_id: str, link: str | None, adapters: dict[str, str]
    ) -> Engine:
        """The client for ``link_id``, attached now if new (``link`` is None when the owner
        knew we had it); older clients of ``entry`` are closed (the owner restarted or
        reloaded it, after draining their requests)."""
        engine = self._engines.get(link_id)
        if engine is None:
            async with self._locks[link_id]:
                engine = self._engines.get(link_id)
                if engine is None:
                    if link is None:
                        raise LinkMissing(link_id)
                    engine = await self._attach(entry, link_id, link)
        await _sync_adapters(engine, adapters)
        return engine

    async def _attach(self, entry: str, link_id: str, link: str) -> Engine:
        for old_id in [k for k, e in self._entry_of.items() if e == entry and k != link_id]:
            old = self._engines.pop(old_id, None)
            self._entry_of.pop(old_id, None)
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.stop()
        # The link comes from the owner, our parent, over a socket only this user can open.
        described: EngineLink = pickle.loads(base64.b64decode(link))
        started = time.perf_counter()
        engine = self._attacher.attach(described, self._index)
        await engine.start()
        log.info(
            "attached to engine",
            extra={"model": entry, "seconds": round(time.perf_counter() - started, 2)},
        )
        self._engines[link_id] = engine
        self._entry_of[link_id] = entry
        return engine

    def attach_ahead(self, links: list[dict[str, Any]]) -> None:
        """Attach to each engine of ``links`` (the owner's ``links()``) in the background, so
        a first request finds its client made; a request meanwhile waits for the same one."""
        for link in links:
            if str(link["link_id"]) in self._engines:
                continue
            task = asyncio.create_task(
                self.get(
                    str(link["entry"]),
                    str(link["link_id"]),
                    str(link["link"]),
                    dict(link["adapters"]),
                )
            )
            self._ahead.add(task)
            task.add_done_callback(self._attached_ahead)

    def _attached_ahead(self, task: asyncio.Task[Engine]) -> None:
        self._ahead.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A request for the model will try again, and answer with the reason.
            log.warning("attaching ahead failed: %s", task.exception())

    async def close(self) -> None:
        """Close every client (the engine cores stay: they are the owner's)."""
        for task in list(self._ahead):
            task.cancel()
        engines, self._engines = self._engines, {}
        for engine in engines.values():
            with contextlib.suppress(Exception):
                await engine.stop()


async def _sync_adapters(engine: Engine, adapters: dict[str, str]) -> None:
    """Each client's serving layer lists adapters of its own: load the owner's set here."""
    if not isinstance(engine, TakesAdapters):
        return
    have = engine.adapters()
    for name, source in adapters.items():
        if name not in have:
            await engine.load_adapter(name, source)
    for name in set(have) - set(adapters):
        with contextlib.suppress(ApplianceError):
            await engine.unload_adapter(name)
