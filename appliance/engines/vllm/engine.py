"""The local engine: an in-process vLLM ``AsyncLLM`` and vLLM's own OpenAI serving layer.

``VLLMEngine`` is the appliance's ``Engine`` interface over one model's ``AsyncLLM`` client:
its start and stop, sleep and wake, requests and LoRA adapters. What it is built from lives
beside it in this package: the arguments (``args``), the launch in its spawn window
(``spawn``), the ``AsyncLLM`` client (``client``), the stat logger (``stats``), cores shared by
several clients (``cores``), adapter ids (``lora``), the serving layer (``serving``) and the
weights (``weights``).

Per engine we build what ``vllm serve`` builds for its one model: the engine client from
vLLM's own argument parser (so engine settings are validated by vLLM itself) and, with
``init_app_state``, that model's chat, completion and embedding serving objects. Requests are
then handed to those objects unchanged: the appliance re-implements no OpenAI semantics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pickle
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter
from starlette.datastructures import State
from starlette.requests import Request

from appliance.catalogue.schema import ModelSpec
from appliance.engines.asgi_call import call_app
from appliance.engines.base import (
    Endpoint,
    EngineFigureSink,
    EngineLink,
    EngineStats,
    JSONReply,
    Reply,
    RouteCall,
)
from appliance.engines.usage import usage_in_json
from appliance.engines.vllm import spawn
from appliance.engines.vllm.client import ClientSeat, new_client
from appliance.engines.vllm.cores import (
    Attachment,
    EngineCores,
    LinkPayload,
    make_link,
    processes_alive,
    read_link,
    refuse_with_several_clients,
    start_watch,
)
from appliance.engines.vllm.lora import (
    PinnableCounter,
    load_adapter,
    served_adapters,
    unload_adapter,
)
from appliance.engines.vllm.processes import core_process_ids
from appliance.engines.vllm.response_store import forget_stored
from appliance.engines.vllm.serving import (
    error_reply,
    handler_of,
    request_types,
    routes_of,
    serve_endpoint,
    vllm_app,
)
from appliance.engines.vllm.stats import StatsRecorder
from appliance.engines.vllm.weights import download_weights, weights_size_gib
from appliance.errors import EngineError, LifecycleError


class VLLMEngine:
    """One local model: vLLM's ``AsyncLLM`` in this process, and its OpenAI serving layer.

    With ``clients`` > 1 it starts the engine cores for that many client processes and is
    client 0 of them (the owner); ``link()`` then tells other processes how to attach as the
    other clients (``attach_engine``). With 1, the default, vLLM starts the cores for this one
    client, as ever.
    """

    def __init__(
        self,
        spec: ModelSpec,
        args: argparse.Namespace,
        *,
        env: Mapping[str, str] | None = None,
        figures: EngineFigureSink | None = None,
        clients: int = 1,
    ) -> None:
        if clients < 1:
            raise ValueError(f"clients must be at least 1, not {clients}")
        self.spec = spec
        self._args = args
        self._env = dict(env or {})
        self._clients = clients
        self._client_index = 0
        self._cores: EngineCores | None = None  # the owner's, with several clients
        self._link: EngineLink | None = None  # the owner's, with several clients
        self._attachment: Attachment | None = None  # set when attached to another's cores
        self._watch_stopped = threading.Event()  # ends the watch on cores this client shares
        self._engine: Any = None
        self._state = State()
        self._app: Any = None  # vLLM's own FastAPI app for this engine (``vllm serve``'s)
        self._routes: frozenset[str] = frozenset()
        self._card: dict[str, Any] | None = None  # this model in vLLM's /v1/models
        self._stats = StatsRecorder(spec.name, figures)
        self._request_types: dict[Endpoint, TypeAdapter[Any]] = {}
        self._sleep_level = 0  # 0 awake, else the level vLLM was put to sleep at
        self._weights_folder: str | None = None  # where a hub model's weights were downloaded

    # -- lifecycle -------------------------------------------------------------------------

    def _create_engine(self) -> Any:
        """Build the AsyncLLM; runs in a worker thread, since vLLM blocks while it starts."""
        if self._attachment is not None:
            return self._attach_client(self._attachment.link, self._attachment.payload)
        engine, vllm_config, cores = spawn.launch_engine(
            self._args, self._env, self._clients, self._stats
        )
        if cores is None:
            return engine
        self._cores = cores
        try:
            pids = cores.pids()
            self._link = make_link(self.spec, self._args, self._clients, vllm_config, cores, pids)
        except BaseException:
            self._shutdown(engine)
            raise
        self._watch_stopped = start_watch(engine, pids, self.spec.name)
        return engine

    def _attach_client(self, link: EngineLink, payload: LinkPayload) -> Any:
        """Client ``self._client_index`` of cores another process started: no launch, no
        spawn (so no spawn window), only this process's sockets."""
        vllm_config = pickle.loads(payload.vllm_config)
        refuse_with_several_clients(vllm_config)
        seat = ClientSeat(
            self._client_index,
            link.client_count,
            link.inputs,
            link.outputs,
            payload.stats_update_address,
        )
        engine = new_client(vllm_config, self._stats, seat)
        self._watch_stopped = start_watch(engine, payload.core_pids, self.spec.name)
        return engine

    def _shutdown(self, engine: Any) -> None:
        """Shut ``engine`` (the client) down and, for an owner of several clients, its cores.

        The client goes first: the cores tell every client still connected that the engine
        is dead (ENGINE_CORE_DEAD), which this one would log as a failure of its output
        handler. Attached clients do hear it, and stop serving.
        """
        cores, self._cores = self._cores, None
        self._watch_stopped.set()  # an orderly end: nothing for the watch to report
        try:
            engine.shutdown()
        finally:
            if cores is not None:
                cores.shutdown()

    def _download_weights(self) -> None:
        """Fetch a hub model's weights before the engine starts (see ``download_weights``)."""
        folder = download_weights(self._args, self.spec.name)
        if folder is not None:
            self._weights_folder = folder

    async def start(self) -> None:
        """Fetch the weights, start the engine processes, build the OpenAI serving layer."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        if self._attachment is None:  # an attached client's owner fetched them
            try:
                await asyncio.to_thread(self._download_weights)
            except Exception as exc:
                raise EngineError(
                    f"model {self.spec.name!r}: downloading its weights failed: {exc}"
                ) from exc
        building = asyncio.ensure_future(asyncio.to_thread(self._create_engine))
        try:
            self._engine = await asyncio.shield(building)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: wait for what it builds and shut that down, so
            # no engine process outlives a cancelled load (SIGTERM while loading, say).
            with contextlib.suppress(Exception):
                engine = await building
                await asyncio.to_thread(self._shutdown, engine)
            raise
        except Exception as exc:
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc
        try:
            tasks = await self._engine.get_supported_tasks()
            self._app = vllm_app(self._args, tasks, self._engine.model_config)
            # The app's state is where vLLM's routes look for their serving objects.
            self._state = self._app.state
            await init_app_state(self._engine, self._state, self._args, tasks)
            if self._clients > 1:
                models = getattr(self._state, "openai_serving_models", None)
                if models is not None:
                    models.lora_id_counter = PinnableCounter(models.lora_id_counter)
            self._routes = routes_of(self._app)
            cards = await self._state.openai_serving_models.show_available_models()
            self._card = cards.data[0].model_dump(mode="json") if cards.data else None
            self._request_types = request_types()
        except Exception as exc:
            await self.stop()
            raise EngineError(f"model {self.spec.name!r} failed to start: {exc}") from exc

    async def stop(self) -> None:
        """Shut the engine's processes down; safe to call twice.

        An attached client closes only itself (aborting what it still has in flight, which
        the cores would otherwise finish for nobody); the cores are its owner's.
        """
        engine, self._engine = self._engine, None
        self._link = None
        if engine is None:
            return
        if self._attachment is not None:
            unfinished = list(engine.output_processor.request_states)
            if unfinished and not engine.errored:
                with contextlib.suppress(Exception):
                    await engine.abort(unfinished, internal=True)
        if self._clients > 1 and engine.get_num_unfinished_requests() == 0:
            # Nothing waits for outputs: end vLLM's output handler now, or closing the
            # client's sockets from shutdown()'s thread may reach it first as EngineDeadError,
            # which it logs as a failure. (With requests in flight it must run on, to fail them.)
            handler = getattr(engine, "output_handler", None)
            if handler is not None:
                handler.cancel()
        # shutdown() joins processes; keep the event loop free while it does.
        await asyncio.to_thread(self._shutdown, engine)

    async def sleep(self, level: int) -> None:
        """vLLM sleep mode: level 1 offloads weights to CPU memory, level 2 drops them."""
        if self._engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        await self._engine.sleep(level)
        self._sleep_level = level

    async def wake_up(self) -> None:
        """Bring a sleeping engine back, the way vLLM documents for its sleep level.

        Level 1 kept the weights in host memory: one ``wake_up()``. Level 2 discarded them:
        wake the weight buffers, reload the weights from their source, then wake the KV cache
        (vLLM's sleep-mode docs); a bare ``wake_up()`` would serve from garbage. Either way the
        engine must then say it is no longer sleeping.
        """
        engine = self._engine
        if engine is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        if self._sleep_level == 2:
            await engine.wake_up(tags=["weights"])
            await engine.collective_rpc("reload_weights")
            awake = await engine.wake_up(tags=["kv_cache"])
        else:
            awake = await engine.wake_up()
        if awake is False or await engine.is_sleeping():
            raise EngineError(
                f"model {self.spec.name!r}: vLLM still reports the engine asleep after waking "
                f"it from level {self._sleep_level}"
            )
        self._sleep_level = 0

    def process_ids(self) -> tuple[int, ...]:
        """The engine-core processes this engine started (none for an attached client)."""
        return core_process_ids(self._engine, self._cores, attached=self._attachment is not None)

    def weights_gib(self) -> float | None:
        """Size of the model's weight files: what level-1 sleep moves into host memory."""
        folder = self._weights_folder or str(self._args.model)
        return weights_size_gib(folder)

    def is_alive(self) -> bool:
        """False once vLLM reports the engine dead (its core process died or raised)."""
        engine = self._engine
        if engine is None or engine.errored:
            return False
        # With cores started apart from this client, vLLM's client does not watch their
        # processes (MPClient.start_engine_core_monitor needs its own engine_manager): a core
        # killed outright sends no ENGINE_CORE_DEAD, so look at the processes themselves.
        if self._cores is not None:
            return self._cores.alive()
        if self._attachment is not None:
            return processes_alive(self._attachment.payload.core_pids)
        return True

    def stats(self) -> EngineStats:
        """Requests in flight in the engine and its KV-cache usage.

        With several clients, each engine step's SchedulerStats (running, waiting, KV cache)
        go to one client only: the first with outputs in that step, else client 0
        (v1/core/sched/scheduler.py Scheduler.update_from_output, "Return stats to only one
        of the front-ends"). A client's latest snapshot may then be any age, so such a client
        reports as its own only its requests in flight, and its snapshot with the time it came
        (``scheduler``): the owner shows the freshest of its clients'. Per-step counts handed
        to the figure sink stay exact summed over the clients (each step's go to exactly one),
        and finished requests' times are each client's own.
        """
        engine = self._engine
        unfinished = engine.get_num_unfinished_requests() if engine is not None else 0
        snapshot = self._stats.snapshot
        if self._clients > 1:
            return EngineStats(running=unfinished, scheduler=snapshot)
        return EngineStats(
            running=unfinished,
            waiting=self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
            scheduler=snapshot,
        )

    def link(self) -> EngineLink | None:
        """How another process attaches to this engine's cores as one more client; None with
        one client, or before the engine has started."""
        return self._link

    # -- requests --------------------------------------------------------------------------

    async def serve(self, call: RouteCall, request: Request) -> Reply:
        """Answer ``call`` as ``vllm serve`` does. One of the three OpenAI routes with its
        parsed body goes straight to vLLM's serving object (validated with vLLM's request
        model, no second parse); any other call goes through vLLM's own app for this engine:
        its validation, its errors, its stream events."""
        if self._engine is None or self._app is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        endpoint = call.endpoint
        if endpoint is not None and call.parsed is not None:
            handler = handler_of(self._state, endpoint, self.spec.name)
            return await serve_endpoint(
                handler, self._request_types, endpoint, call.parsed, request, self._error_reply
            )
        reply = await call_app(
            self._app, call, client=request.scope.get("client"), server=request.scope.get("server")
        )
        if self._engine.errored:
            raise EngineError(f"model {self.spec.name!r}: engine died")
        if isinstance(reply, JSONReply) and reply.status_code == 200:
            reply.usage = usage_in_json(reply.body)
        return reply

    # -- LoRA adapters ---------------------------------------------------------------------

    async def load_adapter(self, name: str, source: str) -> None:
        """Serve the LoRA adapter at ``source`` (folder or hub id) as ``name``, with vLLM's
        own runtime loading (what ``/v1/load_lora_adapter`` does); the engine keeps serving.

        Each client's serving layer keeps its own adapter list: with several clients every
        one of them must load it (the cores load the weights once, see ``shared_lora_id``).
        """
        models = self._serving_models()
        await load_adapter(models, self.spec.name, name, source, shared=self._clients > 1)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter ``name`` (what ``/v1/unload_lora_adapter`` does)."""
        await unload_adapter(self._serving_models(), self.spec.name, name)

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters the engine serves now: name -> path or hub id."""
        return served_adapters(getattr(self._state, "openai_serving_models", None))

    def _serving_models(self) -> Any:
        models = getattr(self._state, "openai_serving_models", None)
        if self._engine is None or models is None:
            raise EngineError(f"model {self.spec.name!r} has no running engine")
        if self._engine.vllm_config.lora_config is None:
            raise LifecycleError(
                f"model {self.spec.name!r} runs without LoRA support; list an adapter under "
                "its adapters (or set enable_lora: true in its engine settings) and reload it"
            )
        return models

    def model_card(self) -> dict[str, Any] | None:
        """This model's entry in vLLM's own ``/v1/models``, as vLLM built it at start."""
        return self._card

    def forget_responses(self, ids: Sequence[str]) -> int:
        """Drop stored responses from vLLM's Responses API store (``response_store``)."""
        return forget_stored(getattr(self._state, "openai_serving_responses", None), ids)

    def routes(self) -> frozenset[str]:
        """The routes vLLM registered for this engine's tasks (``"POST /tokenize"``...)."""
        return self._routes

    def _error_reply(self, exc: Exception) -> JSONReply:
        """Map an exception from vLLM's serving layer with vLLM's own rules."""
        if self._engine is not None and self._engine.errored:
            raise EngineError(f"model {self.spec.name!r}: engine died: {exc}") from exc
        return error_reply(self.spec.name, exc)


def attach_engine(
    link: EngineLink, client_index: int, *, figures: EngineFigureSink | None = None
) -> VLLMEngine:
    """Client ``client_index`` of the engine cores ``link`` describes, not yet started.

    Call from another process of this appliance than the owner's; ``start()`` then builds an
    ``AsyncLLM`` client on that index's addresses (no engine is launched, no weights are
    fetched) and the same OpenAI serving layer as the owner's. Its ``stop()`` closes this
    client only. Each index can be attached once per engine start.

    Raises:
        ValueError: ``client_index`` is 0 (the owner's) or past ``link.client_count``.
    """
    if not 0 < client_index < link.client_count:
        raise ValueError(
            f"model {link.model!r}: client index {client_index} is not one of 1.."
            f"{link.client_count - 1} (0 is the owner's)"
        )
    payload = read_link(link)
    engine = VLLMEngine(payload.spec, payload.args, figures=figures, clients=link.client_count)
    engine._client_index = client_index
    engine._attachment = Attachment(link, payload)
    return engine
