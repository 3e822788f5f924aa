"""``GET /tokenizer_info``: vLLM's tokenizer configuration route, for the models whose
``engine:`` sets ``enable_tokenizer_info_endpoint: true`` (``vllm serve
--enable-tokenizer-info-endpoint``; vLLM registers the route only then).

``vllm serve`` serves one model, so its route names none; here ``?model=NAME`` does, or, without
it, the one model the caller's key may use that has the setting (lm-evaluation-harness's
``tokenizer_backend=remote`` asks so). The request then takes the path of every model route
(``ModelServing.lend_named``: key and model list, load gate, quota, queue limit, load on
demand) and the engine answers it with vLLM's own app. One difference, deliberate: for a caller
who is not an admin, ``name_or_path`` (where the tokenizer was read from: a folder on this
host) is the model's name, as ``/v1/models``' ``root`` is.
"""

from __future__ import annotations

import contextlib
import json
import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from appliance.api.auth import Role, caller_is_admin, require_role
from appliance.api.default_model import callers_models, sole_model
from appliance.api.model_access import Lease, ModelAccess
from appliance.api.serving import ModelServing, endpoint_label
from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.base import JSONReply, Reply, RouteCall
from appliance.engines.route_table import OPTIONAL_ROUTES, TOKENIZER_INFO, route_enabled
from appliance.errors import ApplianceError, WrongTaskError
from appliance.metrics import Metrics
from appliance.request_info import request_info
from appliance.router import Router

_SETTING = OPTIONAL_ROUTES[TOKENIZER_INFO]


def build_tokenizer_info_router(router: Router, access: ModelAccess, metrics: Metrics) -> APIRouter:
    """``GET /tokenizer_info`` over ``router``'s table; ``access`` admits each request."""
    api = APIRouter(tags=["vLLM"])
    serving = ModelServing(access, metrics)

    def chosen(request: Request) -> str:
        named = request.query_params.get("model")
        if named:
            return named
        # Those the caller may use whose entry turns the route on (a remote backend answers
        # for itself: it is asked only when named).
        found = [
            handle.name
            for handle in callers_models(router, request)
            if isinstance(handle.spec, LocalModelSpec)
            and route_enabled(handle.spec.engine, TOKENIZER_INFO)
        ]
        return sole_model(
            found,
            TOKENIZER_INFO.path,
            name_it=f"{TOKENIZER_INFO.path}?model=NAME",
            none_why=f"a model's engine: sets {_SETTING}: true",
        )

    @api.get(
        TOKENIZER_INFO.path,
        summary=TOKENIZER_INFO.summary,
        dependencies=[Depends(require_role(Role.USER))],
        response_class=Response,
    )
    async def tokenizer_info(request: Request) -> Response:
        """The tokenizer's configuration and chat template, as ``vllm serve`` answers it, of
        ``?model=NAME`` (or the one model this key may use that serves it)."""
        request_info(request.scope).endpoint = endpoint_label(TOKENIZER_INFO.path)
        held = await serving.lend_named(request, chosen(request), check=serves_tokenizer_info)
        call = RouteCall(
            route=TOKENIZER_INFO.key,
            method="GET",
            path=TOKENIZER_INFO.path,
            request_id=request.headers.get("x-request-id"),
        )
        reply = await held.ask(call, request)
        if not caller_is_admin(request.scope) and on_this_host(held.lease.entry):
            reply = _without_host_paths(reply, held.lease.model)
        return await serving.answer(request, held, reply)

    def on_this_host(entry: str) -> bool:
        """Whether ``entry`` is a local model (one gone from the table since counts as one:
        its paths are this host's)."""
        with contextlib.suppress(ApplianceError):
            return isinstance(router.supervisor.get(entry).spec, LocalModelSpec)
        return True

    def serves_tokenizer_info(lease: Lease) -> None:
        """Refuse (400) a model whose engine does not serve the route."""
        spec = router.supervisor.get(lease.entry).spec
        routes = lease.engine.routes()
        if (
            isinstance(spec, LocalModelSpec) and not route_enabled(spec.engine, TOKENIZER_INFO)
        ) or (routes is not None and TOKENIZER_INFO.key not in routes):
            raise WrongTaskError(
                f"model {lease.model!r} does not serve {TOKENIZER_INFO.path}: its engine: "
                f"does not set {_SETTING}: true",
                param="model",
            )

    return api


def _without_host_paths(reply: Reply | None, model: str) -> Reply | None:
    """vLLM's answer with ``name_or_path`` (a folder on this host) as the model's name."""
    if not isinstance(reply, JSONReply) or reply.status_code != 200:
        return reply
    try:
        body = json.loads(reply.body)
    except ValueError:
        return reply
    where = body.get("name_or_path") if isinstance(body, dict) else None
    if not isinstance(where, str) or not os.path.isabs(where):
        return reply
    body["name_or_path"] = model
    return JSONReply(reply.status_code, json.dumps(body).encode(), headers=reply.headers)
