"""The usage ledger: every finished model request counted per key and model.

Counts go three ways: into Prometheus counters at once (labelled by ``key`` and ``model``,
both from bounded sets), into the day's running token totals that quotas are checked against,
and into a pending batch written to the SQLite store every few seconds and at shutdown, so
the hot path never waits on a disk write. Totals read through :meth:`UsageLedger.totals`
flush first, so they are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from appliance.errors import InvalidRequestError, QuotaExceededError
from appliance.usage.quotas import QuotaConfig, TokenQuota, window_end, window_start
from appliance.usage.store import Counts, UsageKey, UsageRow, UsageStore

if TYPE_CHECKING:
    from appliance.request_info import RequestInfo

log = logging.getLogger("appliance.usage")

NO_KEY = ""
"""The key name of requests made without a key (the API is open)."""

Now = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UsageLedger:
    """Per-key usage: a ``RequestObserver`` by shape, plus quota checks and stored totals."""

    def __init__(
        self,
        store: UsageStore,
        *,
        key_names: Iterable[str],
        quotas: QuotaConfig,
        registry: CollectorRegistry,
        model_label: Callable[[str | None], str],
        now: Now = _utc_now,
        flush_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self._keys = frozenset(key_names)
        quotas.check_names(self._keys)
        self._quotas: dict[str, TokenQuota] = dict(quotas.quotas)
        self._model_label = model_label
        self._now = now
        self._flush_seconds = flush_seconds
        self._pending: defaultdict[UsageKey, Counts] = defaultdict(Counts)
        # Tokens per (key, day) since the start of the month: what quotas are checked against.
        # Loaded from the store, so a restart does not hand out a fresh allowance.
        self._tokens: defaultdict[tuple[str, date], int] = defaultdict(int)
        if self._quotas:
            self._tokens.update(store.tokens_by_day(self._today().replace(day=1)))
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.requests = Counter(
            "appliance_key_requests",
            "Finished model requests per API key (errors included).",
            ["key", "model"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "appliance_key_prompt_tokens",
            "Prompt tokens per API key.",
            ["key", "model"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "appliance_key_generation_tokens",
            "Generated tokens per API key.",
            ["key", "model"],
            registry=registry,
        )

    def _today(self) -> date:
        return self._now().astimezone(timezone.utc).date()

    def key_label(self, name: object) -> str:
        """``name`` if it is a configured key's name, else ``""``: labels stay a bounded set."""
        return name if isinstance(name, str) and name in self._keys else NO_KEY

    # -- RequestObserver -----------------------------------------------------------------

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Count a finished request to a catalogue model; errors count, but carry no tokens."""
        model = self._model_label(info.model)
        if not model:
            return  # not a model request, or a model name the catalogue does not hold
        key = self.key_label(info.extra.get("key"))
        counts = Counts(requests=1, errors=int(status >= 400))
        if status < 400 and info.usage is not None:
            counts.prompt_tokens = info.usage.prompt_tokens
            counts.completion_tokens = info.usage.completion_tokens
        today = self._today()
        self._pending[(today, key, model)].add(counts)
        if key in self._quotas:
            self._tokens[(key, today)] += counts.tokens
        self.requests.labels(key=key, model=model).inc()
        if counts.tokens:
            self.prompt_tokens.labels(key=key, model=model).inc(counts.prompt_tokens)
            self.generation_tokens.labels(key=key, model=model).inc(counts.completion_tokens)

    # -- quotas --------------------------------------------------------------------------

    def check_quota(self, key: str | None, planned: int = 0) -> None:
        """Raise ``QuotaExceededError`` (429, Retry-After until the reset) if ``key`` is over
        its quota, or would go over it with the ``planned`` tokens a request may generate
        (its ``n x max_tokens``); ``InvalidRequestError`` (400) if ``planned`` alone is more
        than the whole quota, which no wait would help."""
        quota = self._quotas.get(key) if key is not None else None
        if quota is None:
            return
        now = self._now().astimezone(timezone.utc)
        today = now.date()
        for period, limit in quota.limits():
            if planned > limit:
                raise InvalidRequestError(
                    f"this request may generate {planned} tokens (n x max_tokens), more than "
                    f"API key {key!r}'s whole quota of {limit} tokens per {period.value}; "
                    "ask for fewer",
                    param="max_tokens",
                )
            first = window_start(period, today)
            used = sum(n for (k, day), n in self._tokens.items() if k == key and day >= first)
            if used >= limit or used + planned > limit:
                reset = window_end(period, today)
                asked = f"; this request may generate {planned} more" if planned else ""
                raise QuotaExceededError(
                    f"API key {key!r} has used its quota of {limit} tokens per {period.value} "
                    f"({used} used{asked}); it resets at {reset.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                    retry_after=(reset - now).total_seconds(),
                )

    # -- persistence ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the pending counts to the store (in a thread); keep them if the write fails."""
        async with self._flush_lock:
            batch, self._pending = self._pending, defaultdict(Counts)
            if not batch:
                return
            try:
                await asyncio.to_thread(self.store.add, batch)
            except Exception as exc:  # the disk may be full: keep counting, retry next time
                log.error("usage not saved, will retry: %r", exc, extra={"event": "usage_flush"})
                for where, counts in batch.items():
                    self._pending[where].add(counts)
        self._forget_old_days()

    def _forget_old_days(self) -> None:
        first = self._today().replace(day=1)
        for old in [where for where in self._tokens if where[1] < first]:
            del self._tokens[old]

    async def totals(self, *, since: date | None = None, key: str | None = None) -> list[UsageRow]:
        """Totals per key and model from ``since`` on, everything counted so far included."""
        await self.flush()
        return await asyncio.to_thread(self.store.totals, since=since, key=key)

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    def start(self) -> None:
        """Start writing pending counts to the store every few seconds."""
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def stop(self) -> None:
        """Stop the periodic writes and write what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()
