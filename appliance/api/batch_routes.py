"""The OpenAI Files and Batch APIs: ``/v1/files`` and ``/v1/batches``, as the OpenAI SDK
calls them (``client.files.create``, ``client.batches.create/retrieve/list/cancel``).

Every file and batch belongs to the key that made it; another key's ids answer 404. An input
file is checked when uploaded (JSONL, one request object a line, within the caps) and again
when a batch is made of it (each line's ``custom_id``, ``method``, ``url`` and ``model``: a
model the catalogue does not hold or the key may not use is refused, with its line, before
anything runs). The lines then run in the background (``appliance.batches.runner``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from appliance.api.auth import Role, check_model_allowed, require_role
from appliance.api.openai_routes import read_json_object
from appliance.api.priority import key_name
from appliance.batches.runner import BatchRunner
from appliance.batches.settings import BatchSettings
from appliance.batches.store import BatchStore
from appliance.errors import BodyTooLargeError, InvalidRequestError, NotFoundError
from appliance.router import Router
from appliance.settings import Settings

BATCH_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_WINDOW = re.compile(r"^(\d+)([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_METADATA_PAIRS = 16
Owned = TypeVar("Owned")


def _window_seconds(window: Any, settings: BatchSettings) -> float:
    """``completion_window`` ("24h", "30m", "90s") in seconds; 400 if it is not one."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not 0 < seconds <= settings.max_window_hours * 3600:
        raise InvalidRequestError(
            "'completion_window' must be a duration such as '24h' (at most "
            f"{settings.max_window_hours:g}h)",
            param="completion_window",
        )
    return float(seconds)


def check_jsonl(data: bytes, settings: BatchSettings) -> int:
    """The number of requests in a batch input file; 400 naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("the file is not UTF-8 text", param="file") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise InvalidRequestError(
                f"line {number} of the file is not valid JSON", param="file"
            ) from None
        if not isinstance(item, dict):
            raise InvalidRequestError(
                f"line {number} of the file is not a JSON object", param="file"
            )
        count += 1
        if count > settings.max_lines:
            raise InvalidRequestError(
                f"the file has more than {settings.max_lines} requests", param="file"
            )
    if count == 0:
        raise InvalidRequestError("the file holds no requests", param="file")
    return count


def check_batch_lines(request: Request, data: bytes, endpoint: str, router: Router) -> int:
    """Every line of an input file is a request for ``endpoint`` on a model this key may use;
    returns how many. 400 (403 for a model the key may not use) naming the line."""
    custom_ids: set[str] = set()
    count = 0
    for number, text in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        item = json.loads(text)
        where = f"line {number} of the input file"
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidRequestError(f"{where}: 'custom_id' must be a string", param="custom_id")
        if custom_id in custom_ids:
            raise InvalidRequestError(
                f"{where}: custom_id {custom_id!r} is used twice", param="custom_id"
            )
        custom_ids.add(custom_id)
        if item.get("method") != "POST":
            raise InvalidRequestError(f"{where}: 'method' must be 'POST'", param="method")
        if item.get("url") != endpoint:
            raise InvalidRequestError(
                f"{where}: 'url' must be the batch's endpoint {endpoint!r}", param="url"
            )
        body = item.get("body")
        if not isinstance(body, dict):
            raise InvalidRequestError(f"{where}: 'body' must be a JSON object", param="body")
        model = body.get("model")
        target = router.target_of(model) if isinstance(model, str) and model else None
        if target is None:
            raise InvalidRequestError(
                f"{where}: model {model!r} is not in this appliance's catalogue", param="model"
            )
        check_model_allowed(request.scope, model, target.names)  # type: ignore[arg-type]
        count += 1
    return count


def _peer_of(request: Request) -> dict[str, Any]:
    """Where a batch's creator called from: its lines are sent as from there (the same
    loopback and Host rules apply to them as to the creator)."""
    client = request.scope.get("client")
    return {"client": list(client) if client else None, "host": request.headers.get("host")}


def owned(
    request: Request, find: Callable[[str, str], Owned | None], kind: str, oid: Any, param: str
) -> Owned:
    """The caller's ``kind`` of id ``oid`` (``find(owner, id)``); 404 naming ``param`` if the
    caller has none of that id (another key's is none of its own)."""
    found = find(key_name(request.scope), oid) if isinstance(oid, str) else None
    if found is None:
        raise NotFoundError(f"no {kind} {oid!r}", param=param)
    return found


def batch_runner_of(settings: Settings) -> BatchRunner:
    """The batch runner over the store beside the usage database (``batches.db`` and the
    folder ``batch-files``), sending lines as their keys (by the keys' secrets)."""
    folder = settings.usage_db_path().parent
    store = BatchStore(folder / "batches.db", folder / "batch-files")
    secrets = {key.name: key.key.get_secret_value() for key in settings.auth.keys}
    return BatchRunner(store, settings.batches, secrets)


def build_batch_router(runner: BatchRunner, settings: BatchSettings, router: Router) -> APIRouter:
    """The Files and Batch API routes over ``runner``'s store."""
    api = APIRouter(prefix="/v1", tags=["Batch"], dependencies=[Depends(require_role(Role.USER))])
    store = runner.store

    @api.post("/files", summary="Upload a file")
    async def create_file(request: Request) -> JSONResponse:
        """A JSONL file of requests (purpose ``batch``), multipart as the OpenAI SDK sends it."""
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception:  # Starlette's own errors for a broken multipart body
            raise InvalidRequestError(
                "expected a multipart/form-data body with 'file' and 'purpose'"
            ) from None
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise InvalidRequestError("'purpose' must be 'batch'", param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("'file' is required (a JSONL file)", param="file")
        data = await upload.read(settings.max_file_bytes + 1)
        if len(data) > settings.max_file_bytes:
            raise BodyTooLargeError(
                f"the file is over {settings.max_file_bytes} bytes, the limit", param="file"
            )
        check_jsonl(data, settings)
        owner = key_name(request.scope)
        if store.files_of(owner) >= settings.max_files_per_key:
            raise InvalidRequestError(
                f"this key keeps {settings.max_files_per_key} files, the most it may",
                param="file",
            )
        record = store.add_file(owner, upload.filename or "input.jsonl", purpose, data)
        return JSONResponse(record.to_openai())

    @api.get("/files/{file_id}", summary="A file's details")
    async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
        """The file, as OpenAI describes it."""
        return JSONResponse(owned(request, store.file, "file", file_id, "file_id").to_openai())

    @api.get("/files/{file_id}/content", summary="A file's content")
    async def file_content(request: Request, file_id: str) -> Response:
        """The file's bytes (a batch's output and error files are JSONL)."""
        record = owned(request, store.file, "file", file_id, "file_id")
        return Response(store.content(record), media_type="application/octet-stream")

    @api.post("/batches", summary="Create a batch")
    async def create_batch(request: Request) -> JSONResponse:
        """A batch over an uploaded file; its lines run in the background, least urgent."""
        body = await read_json_object(request)
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequestError(
                f"'endpoint' must be one of {', '.join(sorted(BATCH_ENDPOINTS))}",
                param="endpoint",
            )
        window = _window_seconds(body.get("completion_window"), settings)
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= MAX_METADATA_PAIRS
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise InvalidRequestError(
                f"'metadata' must map at most {MAX_METADATA_PAIRS} strings to strings",
                param="metadata",
            )
        file_id = body.get("input_file_id")
        owner = key_name(request.scope)
        record = owned(request, store.file, "file", file_id, "input_file_id")
        if record.purpose != "batch":
            raise InvalidRequestError(
                f"file {file_id!r} has purpose {record.purpose!r}, not 'batch'",
                param="input_file_id",
            )
        total = check_batch_lines(request, store.content(record), endpoint, router)
        batch = store.add_batch(
            owner=owner,
            peer=_peer_of(request),
            endpoint=endpoint,
            input_file_id=record.id,
            completion_window=body["completion_window"],
            window_seconds=window,
            total=total,
            metadata=metadata,
        )
        runner.launch(batch.id)
        return JSONResponse(batch.to_openai())

    @api.get("/batches/{batch_id}", summary="A batch")
    async def retrieve_batch(request: Request, batch_id: str) -> JSONResponse:
        """The batch, with its progress (``request_counts``)."""
        return JSONResponse(owned(request, store.batch, "batch", batch_id, "batch_id").to_openai())

    @api.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
    async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        """Stop the batch: lines not yet sent are not run; it ends ``cancelled``."""
        owned(request, store.batch, "batch", batch_id, "batch_id")
        record = runner.cancel(key_name(request.scope), batch_id)
        return JSONResponse(record.to_openai() if record else {})

    @api.get("/batches", summary="List batches")
    async def list_batches(
        request: Request, after: str | None = None, limit: int = 20
    ) -> JSONResponse:
        """This key's batches, newest first (``after``: the last id of the previous page)."""
        if not 1 <= limit <= 100:
            raise InvalidRequestError("'limit' must be from 1 to 100", param="limit")
        found = store.batches_of(key_name(request.scope), after=after, limit=limit + 1)
        page = [record.to_openai() for record in found[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(found) > limit,
            }
        )

    return api
