"""Ollama's ``/api/pull`` and ``/api/delete``, for admin keys: the appliance's hub pull and rm.

``POST /api/pull`` is ``appliance models pull NAME`` on the appliance's own disk (the admin
route ``POST /admin/models/NAME/pull``): NAME is a catalogue entry with a hub source, or a hub
id (``ORG/NAME``); Ollama's registry is never asked. Its progress streams as Ollama streams
a pull, one JSON object per line: ``{"status": "pulling manifest"}`` once the plan is made,
``{"status": "pulling FILE", "digest": FILE, "total": N, "completed": M}`` per file as it
comes (Ollama names a layer by its digest; here the repository's file path stands for it),
then ``{"status": "success"}``, or ``{"error": "..."}`` if the download fails part-way. With
``"stream": false`` the answer is the last of these alone. A pull that cannot start (not a hub
id, a local folder, gated, missing, no disk) is a 400 before anything streams.

``DELETE /api/delete`` is ``appliance models rm NAME``: the cached hub files are deleted
(200, an empty body, as Ollama answers), refused while a model using them is loaded (409) and
for a local source (400: the operator's files are never deleted); a name with nothing on disk
is Ollama's 404. The catalogue (models.yaml) is not changed by either.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.api.auth import Role, require_role
from appliance.api.hub_routes import ndjson, planned_pull, pull_events, remove_files
from appliance.api.ollama_routes import ollama_error
from appliance.api.ollama_schema import model_name
from appliance.api.openai_routes import read_json_object
from appliance.appliance import Appliance
from appliance.errors import InvalidRequestError, ModelNotFoundError

SUCCESS = {"status": "success"}


def ollama_pull_status(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """One of the hub pull's events (``PullEvent.to_dict``, or the route's ``error``) as the
    line Ollama streams for it; None for one Ollama has no line for."""
    kind = event.get("event")
    if kind == "plan":
        return {"status": "pulling manifest"}
    if kind in ("progress", "file_done"):
        total = int(event.get("total") or 0)
        completed = total if kind == "file_done" else int(event.get("done") or 0)
        name = str(event.get("file"))
        return {"status": f"pulling {name}", "digest": name, "total": total, "completed": completed}
    if kind == "done":
        return dict(SUCCESS)
    if kind == "error":
        return {"error": str(event.get("message") or "the pull failed")}
    return None


def _asked_model(body: Mapping[str, Any]) -> str:
    """The model a pull or delete names (``model``, or the older ``name``); 400 without one."""
    asked = body.get("model", body.get("name"))
    if not isinstance(asked, str) or not asked.strip():
        raise InvalidRequestError("model is required (a catalogue name or a hub id)", param="model")
    return asked


def build_ollama_manage_router(app: Appliance) -> APIRouter:
    """``/pull`` and ``/delete`` over ``app``'s hub cache, for a router under ``/api``."""
    api = APIRouter()

    @api.post("/pull", summary="Ollama: pull a model's files from the hub (admin)")
    async def pull(request: Request) -> Response:
        """The hub pull of a catalogue entry or hub id, streamed as Ollama streams a pull."""
        require_role(Role.ADMIN)(request)
        body = await read_json_object(request)
        name = model_name(_asked_model(body))
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise InvalidRequestError("stream must be true or false", param="stream")
        plan = await planned_pull(app, name)
        statuses = _statuses(pull_events(plan, request, app.settings.disk_reserve_bytes()))
        if stream:
            return StreamingResponse(ndjson(statuses), media_type="application/x-ndjson")
        last: dict[str, Any] = {}
        async with contextlib.aclosing(statuses):
            async for status in statuses:
                last = status
        if "error" in last:
            # The hub (upstream) failed part-way: not the caller's request.
            return ollama_error(last["error"], 502)
        return JSONResponse(last or SUCCESS)

    @api.delete("/delete", summary="Ollama: delete a model's files (admin)")
    async def delete(request: Request) -> Response:
        """Free a hub model's cached files, as ``appliance models rm`` does."""
        require_role(Role.ADMIN)(request)
        body = await read_json_object(request)
        asked = _asked_model(body)
        name = model_name(asked)
        if name not in app.catalogue and name.count("/") != 1:
            raise ModelNotFoundError(f"model '{asked}' not found", param="model")
        repo, freed = await remove_files(app, name)
        if not freed:
            raise ModelNotFoundError(
                f"model '{asked}' not found: no files of {repo} on disk", param="model"
            )
        return Response(status_code=200)

    return api


async def _statuses(
    events: AsyncGenerator[dict[str, Any], None],
) -> AsyncGenerator[dict[str, Any], None]:
    async with contextlib.aclosing(events):  # closed with this: the pull stops between files
        async for event in events:
            status = ollama_pull_status(event)
            if status is not None:
                yield status
