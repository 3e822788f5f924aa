"""The router: a model name to the engine that serves it, local or remote."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from appliance.api.route_table import wrong_route_message
from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.schema import ModelSpec, Task
from appliance.engines.base import Endpoint, Engine
from appliance.errors import BackendUnavailableError, WrongTaskError
from appliance.supervisor.supervisor import Supervisor

_TASK_OF = {
    Endpoint.CHAT: Task.GENERATE,
    Endpoint.COMPLETIONS: Task.GENERATE,
    Endpoint.EMBEDDINGS: Task.EMBED,
}

RemoteLookup = Callable[[ModelSpec], Engine]


class Router:
    """Finds the engine for a request; the supervisor lends local ones, remote ones are shared."""

    def __init__(
        self,
        catalogue: Catalogue,
        supervisor: Supervisor,
        remote: RemoteLookup | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.supervisor = supervisor
        self._remote = remote

    @contextlib.asynccontextmanager
    async def engine_for(self, model: str, endpoint: Endpoint) -> AsyncIterator[Engine]:
        """The engine serving ``model`` for ``endpoint``, held for the request's lifetime."""
        spec = self.catalogue.get(model)
        # With task 'auto' the engine itself refuses a route it does not serve.
        if spec.task is not Task.AUTO and _TASK_OF[endpoint] is not spec.task:
            raise WrongTaskError(
                f"model {model!r} is a {spec.task.value} model and does not serve "
                f"/v1/{endpoint.value}",
                param="model",
            )
        async with self.any_engine_for(model) as engine:
            routes = engine.routes()
            route = f"POST /v1/{endpoint.value}"
            if routes is not None and route not in routes:
                raise WrongTaskError(
                    wrong_route_message(model, f"/v1/{endpoint.value}", routes), param="model"
                )
            yield engine

    @contextlib.asynccontextmanager
    async def any_engine_for(self, model: str) -> AsyncIterator[Engine]:
        """The engine serving ``model``, whatever its task; the engine says which routes it
        serves (``Engine.routes``)."""
        spec = self.catalogue.get(model)
        if spec.is_local:
            async with self.supervisor.acquire(model) as engine:
                yield engine
            return
        if self._remote is None:
            raise BackendUnavailableError(f"model {model!r}: remote backends are not enabled")
        yield self._remote(spec)
