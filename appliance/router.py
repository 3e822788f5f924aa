"""The router: a model name to the engine that serves it, lent by the supervisor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.schema import Task
from appliance.engines.base import Endpoint, Engine
from appliance.engines.route_table import wrong_route_message
from appliance.errors import WrongTaskError
from appliance.supervisor.load_gate import LoadGate
from appliance.supervisor.supervisor import Supervisor, Target

_TASK_OF = {
    Endpoint.CHAT: Task.GENERATE,
    Endpoint.COMPLETIONS: Task.GENERATE,
    Endpoint.EMBEDDINGS: Task.EMBED,
}


class Router:
    """Finds the engine for a request: checks the endpoint fits the model, then borrows it.
    ``load_gate`` refuses the on-demand loads a caller may not start (None: none refused)."""

    def __init__(
        self, catalogue: Catalogue, supervisor: Supervisor, *, load_gate: LoadGate | None = None
    ) -> None:
        self.catalogue = catalogue
        self.supervisor = supervisor
        self._load_gate = load_gate

    def target_of(self, model: str) -> Target | None:
        """Where a request for ``model`` (a name, alias or adapter) goes; None if nowhere."""
        return self.supervisor.target_of(model)

    @contextlib.asynccontextmanager
    async def engine_for(
        self, model: str, endpoint: Endpoint, *, may_load: bool | None = None
    ) -> AsyncIterator[Engine]:
        """The engine serving ``model`` (a name or an alias) for ``endpoint``, held for the
        request's lifetime; 404 if no entry answers to that name. ``may_load``: whether the
        caller may start an on-demand load (the load gate's to say; None: not checked)."""
        model = self.supervisor.resolve(model)
        self._check_load(model, may_load)
        spec = self.supervisor.get(model).spec
        # With task 'auto' (the default) the engine says which routes it serves.
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
    async def any_engine_for(
        self, model: str, *, may_load: bool | None = None
    ) -> AsyncIterator[Engine]:
        """The engine serving ``model`` (a name, alias or adapter), whatever its task, held for
        the request's lifetime; the engine says which routes it serves (``Engine.routes``).
        ``may_load``: as for ``engine_for``."""
        entry = self.supervisor.resolve(model)
        self._check_load(entry, may_load)
        async with self.supervisor.acquire(entry) as engine:
            yield engine

    def _check_load(self, model: str, may_load: bool | None) -> None:
        """Refuse a load on demand of table entry ``model`` that the caller may not start
        now (``LoadGate.check``)."""
        if self._load_gate is not None and may_load is not None:
            self._load_gate.check(model, may_load=may_load)
