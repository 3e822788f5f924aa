"""Which model a request means when it names none, as ``vllm serve`` (one model) answers it.

``vllm serve`` serves one model, so some of its routes take ``model`` as optional: a client
written for it leaves it out (lm-evaluation-harness's ``tokenizer_backend=remote`` sends
``POST /tokenize`` and ``/detokenize`` with no ``model``, after ``GET /tokenizer_info``). Here a
request without one goes to the one model the caller may use that serves the route (one named
on the key's model list, or the one model of the table); with several, a 400 names them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import Request

from appliance.api.auth import model_allowed
from appliance.errors import InvalidRequestError
from appliance.router import Router
from appliance.supervisor.handle import ModelHandle

DefaultModel = Callable[[Request, str], Awaitable[str]]
"""The model a request to a route (``"POST /tokenize"``) means when its body names none
(``InvalidRequestError`` when that is not one model)."""


def sole_model(found: Iterable[str], path: str, *, name_it: str, none_why: str = "") -> str:
    """The one model in ``found`` for a request to ``path`` that named none; else a 400 that
    says how to name one (``name_it``: ``"'model' in the body"``), and, when there is none,
    why (``none_why``)."""
    names = sorted(set(found))
    if len(names) == 1:
        return names[0]
    if not names:
        why = f" ({none_why})" if none_why else ""
        raise InvalidRequestError(
            f"no model this key may use serves {path}{why}; name one with {name_it}",
            param="model",
        )
    raise InvalidRequestError(
        f"several models serve {path}: name one with {name_it} ({', '.join(names)})",
        param="model",
    )


def may_serve(handle: ModelHandle, route: str) -> bool:
    """Whether ``handle``'s model may answer ``route``: unknown until its engine runs (a
    remote backend answers for itself), so only a running engine that lists its routes and
    leaves ``route`` out is ruled out."""
    engine = handle.engine
    routes = engine.routes() if engine is not None else None
    return routes is None or route in routes


def callers_models(router: Router, request: Request) -> list[ModelHandle]:
    """The table's entries the caller's key may use, by any of their names."""
    return [
        handle
        for handle in router.supervisor.handles()
        if any(model_allowed(request.scope, name) for name in handle.spec.names())
    ]


def table_default_model(router: Router) -> DefaultModel:
    """``DefaultModel`` over ``router``'s table: the one entry the caller may use that may
    serve the route."""

    async def choose(request: Request, route: str) -> str:
        found = [h.name for h in callers_models(router, request) if may_serve(h, route)]
        return sole_model(found, route.split(" ", 1)[1], name_it="'model' in the body")

    return choose
