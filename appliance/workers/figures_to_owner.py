"""A worker's request figures, sent to the owner in batches to count (metrics, per-key usage)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import defaultdict
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.engines.base import EngineStepFigures
from appliance.request_info import RequestInfo
from appliance.workers.control import ControlClient, ControlError
from appliance.workers.scheduler_figures import UnsentSnapshots

ANSWERED_BY_OWNER = "answered_by_owner"


class FiguresToOwner:
    """Request figures of this worker, sent to the owner to count (metrics, per-key usage).

    Finished requests and inter-token gaps are batched and sent by one task, at most
    ``period`` seconds after they happen, so counting costs no round trip per request.
    """

    def __init__(
        self,
        control: ControlClient,
        *,
        period: float = 0.2,
        schedulers: UnsentSnapshots | None = None,
    ) -> None:
        """``schedulers``: this worker's clients' scheduler figures, sent with each batch
        when newer ones came (the owner shows the freshest client's gauges)."""
        self._control = control
        self._schedulers = schedulers
        self._period = period
        self._requests: list[dict[str, Any]] = []
        self._gaps: defaultdict[str, list[float]] = defaultdict(list)
        self._waits: defaultdict[str, list[float]] = defaultdict(list)
        self._steps: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Requests whose answer is out but which are not counted yet (a few instructions).
        self._finishing = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def answer_sent(self) -> None:
        """A request's last byte went out; its figures follow (``counted``)."""
        self._finishing += 1
        self._settled.clear()

    def counted(self) -> None:
        """A request whose answer went out has been handed to ``on_request_done``."""
        self._finishing -= 1
        if self._finishing == 0:
            self._settled.set()

    async def flush(self) -> None:
        """Send every figure of the requests answered so far, now (the owner asks this
        before a scrape, so a client that saw its answer sees it counted)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout=2.0)
        await self._flush()

    def start(self) -> None:
        """Start sending."""
        self._task = asyncio.create_task(self._send_every())

    async def stop(self) -> None:
        """Send what is left, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._flush()

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Queue a finished request (one passed to the owner is the owner's to count)."""
        if info.extra.get(ANSWERED_BY_OWNER):
            return
        usage = info.usage
        self._requests.append(
            {
                "request_id": info.request_id,
                "model": info.model,
                "endpoint": info.endpoint,
                "usage": [usage.prompt_tokens, usage.completion_tokens] if usage else None,
                "stream": info.stream,
                "ttft": (info.first_token_at - info.started)
                if info.first_token_at is not None
                else None,
                "extra": {"key": info.extra["key"]} if "key" in info.extra else {},
                "status": status,
                "seconds": seconds,
            }
        )
        self._wake.set()

    def record_engine_step(self, model: str, figures: EngineStepFigures) -> None:
        """Queue one engine step's figures of this worker's client (``--engine-metrics``)."""
        self._steps[model].append(dataclasses.asdict(figures))

    def observe_inter_token(self, model: str, seconds: float) -> None:
        """Queue one gap between two tokens of a stream."""
        self._gaps[model].append(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Queue the wait of a request admitted here (the owner times those it lends)."""
        self._waits[model].append(seconds)

    async def _send_every(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._period)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        requests, self._requests = self._requests, []
        gaps, self._gaps = dict(self._gaps), defaultdict(list)
        steps, self._steps = dict(self._steps), defaultdict(list)
        waits, self._waits = dict(self._waits), defaultdict(list)
        schedulers = self._schedulers.take() if self._schedulers is not None else {}
        if requests or gaps or steps or waits or schedulers:
            with contextlib.suppress(ControlError):
                await self._control.call(
                    "observe",
                    requests=requests,
                    gaps=gaps,
                    steps=steps,
                    waits=waits,
                    schedulers=schedulers,
                )


class Settling:
    """Tells ``figures`` when a request's answer is out and when it has been counted, so
    that a flush waits for the counts of every answer a client may have seen."""

    def __init__(self, app: ASGIApp, figures: FiguresToOwner) -> None:
        self._app = app
        self._figures = figures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        sent = False

        async def watched(message: Message) -> None:
            nonlocal sent
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not sent:
                sent = True
                self._figures.answer_sent()
            await send(message)

        try:
            await self._app(scope, receive, watched)
        finally:
            if sent:
                self._figures.counted()
