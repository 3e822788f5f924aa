"""Admin routes about models' files: pull from the hub, what is on disk, free it.

``POST /admin/models/{name}/pull`` is the CLI's `models pull` run on the appliance's own disk.
The answer streams one JSON object per line (``application/x-ndjson``): the plan, progress per
file, ``file_done``, then ``done`` or ``error``, so a remote CLI draws the same bars as a local
one. Only hub ids are pulled, by name or by a catalogue entry's hub source: a request over HTTP
never names a local path (the trust rule for anything that arrives over the network).
``GET /admin/files`` says per local entry whether its files are there and their size;
``DELETE /admin/models/{name}/files`` frees a hub entry's cache, refused while it is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.api.auth import Role, require_role
from appliance.appliance import Appliance
from appliance.errors import LifecycleError, PullRefusedError
from appliance.hub.disk import files_on_disk, remove_from_cache
from appliance.hub.pull import (
    LocalSourceError,
    PullError,
    PullEvent,
    PullPlan,
    PullTarget,
    check_disk,
    check_repo_id,
    plan_pull,
    run_pull,
    target_for_spec,
)
from appliance.supervisor.states import ModelState


def _base_dir(app: Appliance) -> Path:
    return Path(app.settings.config_path).resolve().parent


def pull_target(app: Appliance, name: str) -> PullTarget:
    """A catalogue entry's hub source, else ``name`` itself when it is a hub id."""
    base_dir = _base_dir(app)
    try:
        if name in app.catalogue:
            return target_for_spec(app.catalogue.get(name), base_dir)
        return PullTarget(repo_id=check_repo_id(name))
    except PullError as exc:
        raise PullRefusedError(str(exc), param="name") from None


async def planned_pull(app: Appliance, name: str) -> PullPlan:
    """The plan of a pull of ``name`` (entry or hub id) into the appliance's cache, its disk
    checked; ``PullRefusedError`` (400, one line) if it cannot start."""
    target = pull_target(app, name)
    try:
        plan = await asyncio.to_thread(
            plan_pull, target.repo_id, revision=target.revision, cache_dir=target.cache_dir
        )
        check_disk(plan, app.settings.disk_reserve_bytes())
    except PullError as exc:
        raise PullRefusedError(str(exc), param="name") from None
    return plan


async def pull_events(
    plan: PullPlan, request: Request, reserve_bytes: int
) -> AsyncGenerator[dict[str, Any], None]:
    """Run ``plan`` in a thread; its events as they come (``PullEvent.to_dict``), the last
    ``done`` or ``error``. Stops between files once the client has gone."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()  # None: the end
    cancelled = threading.Event()

    def emit(event: PullEvent) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event.to_dict())

    def work() -> None:
        try:
            run_pull(plan, emit, cancelled=cancelled, reserve_bytes=reserve_bytes)
        except PullError as exc:
            loop.call_soon_threadsafe(
                queue.put_nowait, {"event": "error", "repo": plan.repo_id, "message": str(exc)}
            )
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    worker = loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        # The client went away (or the stream ended): stop between files. The file being
        # fetched finishes into the cache, so a later pull does not fetch it again.
        cancelled.set()
        if not await request.is_disconnected():
            with contextlib.suppress(Exception):
                await worker


async def ndjson(events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """``events`` as NDJSON lines; closing this (the client went away) closes ``events``
    at once, so a pull stops between files."""
    async with contextlib.aclosing(events):
        async for event in events:
            yield (json.dumps(event) + "\n").encode()


def build_hub_router(app: Appliance) -> APIRouter:
    """The admin route that pulls a model's files into the appliance's hub cache."""
    api = APIRouter(
        prefix="/admin", tags=["Admin"], dependencies=[Depends(require_role(Role.ADMIN))]
    )

    @api.post("/models/{name:path}/pull", summary="Download a model's files from the hub")
    async def pull(name: str, request: Request) -> StreamingResponse:
        """Plan (files, sizes, disk check) first: a refusal is a 400 with one line. Then stream
        the download's progress as NDJSON events."""
        plan = await planned_pull(app, name)
        events = pull_events(plan, request, app.settings.disk_reserve_bytes())
        return StreamingResponse(ndjson(events), media_type="application/x-ndjson")

    @api.get("/files", summary="Each local model's files on disk")
    async def files() -> JSONResponse:
        """Per local entry: whether a loadable set of files is there, their size, where."""

        def scan() -> list[dict[str, object]]:
            rows = []
            for spec in app.catalogue.specs():
                if getattr(spec, "source", None) is not None:
                    found = files_on_disk(spec, _base_dir(app))
                    rows.append({"name": spec.name, "source": spec.source, **asdict(found)})
            return rows

        return JSONResponse({"object": "list", "data": await asyncio.to_thread(scan)})

    @api.delete("/models/{name:path}/files", summary="Free a hub model's files")
    async def remove(name: str) -> JSONResponse:
        """Delete the cached hub files of an entry (or hub id); 409 while a model using them
        is loaded, 400 for a local folder (the operator's files, never deleted here)."""
        repo, freed = await remove_files(app, name)
        return JSONResponse({"name": name, "repo": repo, "freed_bytes": freed})

    return api


async def remove_files(app: Appliance, name: str) -> tuple[str, int]:
    """Delete the cached hub files of ``name`` (entry or hub id): the hub id and the bytes
    freed. ``LifecycleError`` (409) while a model using them is loaded; ``PullRefusedError``
    (400) for a local source (the operator's files, never deleted here)."""
    if name in app.catalogue:
        try:
            target_for_spec(app.catalogue.get(name), _base_dir(app))
        except LocalSourceError:
            raise PullRefusedError(
                f"{name} is served from a local source: the operator's files are never "
                "deleted by the appliance",
                param="name",
            ) from None
        except PullError:
            pass  # refused below, in pull_target's words
    target = pull_target(app, name)
    for spec in app.catalogue.specs():
        if getattr(spec, "source", None) is None:
            continue
        try:
            same = target_for_spec(spec, _base_dir(app)).repo_id == target.repo_id
        except PullError:
            continue
        state = app.supervisor.get(spec.name).state
        if same and state not in (ModelState.UNLOADED, ModelState.FAILED):
            raise LifecycleError(
                f"{spec.name} is {state.value} from {target.repo_id}: unload it first"
            )
    return target.repo_id, await asyncio.to_thread(remove_from_cache, target)
