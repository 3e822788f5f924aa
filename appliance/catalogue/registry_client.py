"""The catalogue from the registry service: one fetch (``RegistryClient``), and a background
refresh that falls back to the last good answer, then to ``models.yaml`` (``RegistryPoller``).

A registry that is down, slow, or answers anything but a clean list of valid entries counts as
unavailable: a bad answer never replaces a good catalogue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from appliance.catalogue.schema import ModelSpec, untagged_error
from appliance.errors import ApplianceError

logger = logging.getLogger("appliance.registry")

MODELS_PATH = "/v1/registry/models"
MAX_ANSWER_BYTES = 16 * 2**20  # a catalogue entry is a few hundred bytes
READ_TOKEN_ENV = "APPLIANCE_REGISTRY_READ_TOKEN"


class RegistryUnavailableError(ApplianceError):
    """The registry cannot be reached, timed out, or refused to answer (non-200)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "registry_unavailable"


class RegistryBadAnswerError(RegistryUnavailableError):
    """The registry answered 200 with something that is not a valid catalogue."""

    status_code = 502
    code = "registry_bad_answer"


class CatalogueSource(str, enum.Enum):
    """Where the catalogue in use came from."""

    REGISTRY = "registry"  # the registry's latest answer
    REGISTRY_CACHE = "registry_cache"  # the registry's last good answer; it is down now
    FILE = "file"  # models.yaml; the registry has not answered since start


class RegistryStatus(BaseModel):
    """What ``GET /admin/registry`` shows: the registry's health and the catalogue in use."""

    model_config = ConfigDict(extra="forbid")

    url: str
    up: bool
    source: CatalogueSource
    ttl: float
    models: int
    last_success_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None


# The registry's wire format, as ``appliance.registry.service`` answers it. Kept here rather than
# imported so the appliance does not depend on the service's modules. The envelope tolerates new
# fields; each entry's ``spec`` is a ``ModelSpec`` and refuses unknown keys.
class _WireEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    spec: ModelSpec


class _WireList(BaseModel):
    model_config = ConfigDict(extra="ignore")

    object: Literal["list"]
    data: list[_WireEntry]


class RegistryClient:
    """Fetches the whole catalogue from one registry service."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        client: httpx.AsyncClient | None = None,
        token: SecretStr | None = None,
        max_entries: int = 1000,
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        """``timeout`` bounds a whole fetch, connect to last byte; ``client`` is borrowed (not
        closed by ``aclose``) when given, else the registry client makes and owns one (which
        checks HTTPS certificates). ``token`` is sent as a Bearer token on reads; an answer
        over ``max_bytes`` or with more than ``max_entries`` entries is refused."""
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._token = token
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()

    @property
    def url(self) -> str:
        """The registry's base URL."""
        return self._url

    async def fetch(self) -> list[ModelSpec]:
        """Every entry in the registry; ``RegistryUnavailableError`` (or its subclass
        ``RegistryBadAnswerError``) if the registry cannot give a clean, valid list."""
        timed_out = RegistryUnavailableError(
            f"registry {self._url} did not answer within {self._timeout:g}s"
        )
        # The deadline covers the whole exchange: httpx's own timeouts are per read, so a
        # server dripping bytes slowly would otherwise hold a fetch for ever. Not
        # asyncio.wait_for: before Python 3.12 it can swallow a cancellation that arrives as
        # the request completes, and then RegistryPoller.stop() would wait for ever.
        request = asyncio.ensure_future(self._get())
        try:
            await asyncio.wait({request}, timeout=self._timeout)
        finally:
            if not request.done():  # timed out, or this fetch was cancelled
                request.cancel()
                await asyncio.wait({request})  # let it close its connection; never raises
        try:
            status, content = request.result()
        except asyncio.CancelledError as exc:  # cancelled above, on the deadline
            raise timed_out from exc
        except httpx.TimeoutException as exc:
            raise timed_out from exc
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise RegistryUnavailableError(f"cannot reach registry {self._url}: {reason}") from exc
        if status != 200:
            raise RegistryUnavailableError(
                f"registry {self._url} answered HTTP {status} to GET {MODELS_PATH}"
            )
        return self._parse(content)

    async def _get(self) -> tuple[int, bytes]:
        """GET the list: its status and at most ``max_bytes`` of its body (else refused)."""
        headers = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        request = self._client.build_request(
            "GET", self._url + MODELS_PATH, headers=headers, timeout=self._timeout
        )
        response = await self._client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > self._max_bytes:
                    raise RegistryBadAnswerError(
                        f"registry {self._url} answered more than {self._max_bytes} bytes"
                    )
            return response.status_code, bytes(body)
        finally:
            await response.aclose()

    def _parse(self, content: bytes) -> list[ModelSpec]:
        """The specs in a list answer; ``RegistryBadAnswerError`` for anything malformed."""
        try:
            answer = _WireList.model_validate_json(content)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            # data.N.spec.<kind>.field: the kind pydantic tried is noise to the reader.
            first = untagged_error(first, at=3)
            where = ".".join(str(part) for part in first["loc"]) or "answer"
            raise RegistryBadAnswerError(
                f"registry {self._url} answered an invalid catalogue "
                f"({exc.error_count()} error(s); {where}: {first['msg']})"
            ) from exc
        if len(answer.data) > self._max_entries:
            raise RegistryBadAnswerError(
                f"registry {self._url} answered {len(answer.data)} entries, over the limit of "
                f"{self._max_entries} (models.yaml: registry_trust.max_entries)"
            )
        seen: set[str] = set()
        for entry in answer.data:
            if entry.name != entry.spec.name:
                raise RegistryBadAnswerError(
                    f"registry {self._url} answered entry {entry.name!r} holding model "
                    f"{entry.spec.name!r}"
                )
            if entry.name in seen:
                raise RegistryBadAnswerError(
                    f"registry {self._url} answered model {entry.name!r} twice"
                )
            seen.add(entry.name)
        return [entry.spec for entry in answer.data]

    async def aclose(self) -> None:
        """Close the HTTP client if this registry client made it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


OnChange = Callable[[list[ModelSpec], CatalogueSource], Awaitable[None]]
"""Called (and awaited) with the new catalogue and its source whenever either changes."""


class RegistryPoller:
    """Keeps a catalogue fresh from the registry, every ``ttl`` seconds, in the background.

    The catalogue in use is the registry's latest answer; while the registry is down, its last
    good answer; until it has answered once, ``fallback`` (the entries of ``models.yaml``).
    ``on_change`` is awaited once per change of catalogue or source, never concurrently with
    itself, and first on ``start()``. The constructor starts nothing.
    """

    def __init__(
        self,
        client: RegistryClient,
        *,
        ttl: float,
        fallback: Sequence[ModelSpec],
        on_change: OnChange,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._client = client
        self._ttl = ttl
        self._fallback = list(fallback)
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._specs: list[ModelSpec] = list(self._fallback)
        self._source = CatalogueSource.FILE
        self._delivered: tuple[list[ModelSpec], CatalogueSource] | None = None
        self._last_good: list[ModelSpec] | None = None
        self._up: bool | None = None  # None: not asked yet
        self._last_success_at: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None

    @property
    def specs(self) -> list[ModelSpec]:
        """The catalogue in use."""
        return list(self._specs)

    @property
    def source(self) -> CatalogueSource:
        """Where the catalogue in use came from."""
        return self._source

    def replace_fallback(self, specs: Sequence[ModelSpec]) -> None:
        """Use ``specs`` (a re-read models.yaml) as the fallback from now on."""
        self._fallback = list(specs)

    async def start(self) -> None:
        """Fetch once (so the caller starts with the right catalogue), then refresh every
        ``ttl`` seconds in a background task until ``stop()``. A down registry delays this by
        at most the client's timeout."""
        if self._task is not None:
            raise RuntimeError("the registry poller is already running")
        await self.refresh()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="registry-poller")

    async def stop(self) -> None:
        """Stop the background refresh and wait for it to end; the catalogue stays as it is."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def refresh(self) -> RegistryStatus:
        """Ask the registry now, update the catalogue, and tell ``on_change`` if it changed."""
        async with self._lock:
            try:
                specs = await self._client.fetch()
            except RegistryUnavailableError as exc:
                self._registry_failed(exc)
                if self._last_good is not None:
                    await self._use(self._last_good, CatalogueSource.REGISTRY_CACHE)
                else:
                    await self._use(self._fallback, CatalogueSource.FILE)
            else:
                self._registry_answered(specs)
                await self._use(specs, CatalogueSource.REGISTRY)
            return self.status()

    def status(self) -> RegistryStatus:
        """The registry's health as last seen, and the catalogue in use."""
        return RegistryStatus(
            url=self._client.url,
            up=bool(self._up),
            source=self._source,
            ttl=self._ttl,
            models=len(self._specs),
            last_success_at=self._last_success_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
        )

    async def _run(self) -> None:
        """The background loop: wait a TTL, refresh, again, until ``stop()``."""
        # The flag as well as the cancel: code under refresh() (a handler, a library) that
        # swallows the CancelledError must not keep the loop alive.
        while not self._stopping:
            await asyncio.sleep(self._ttl)
            if not self._stopping:
                await self.refresh()

    def _registry_failed(self, exc: RegistryUnavailableError) -> None:
        """Record a failed fetch; log only when the registry goes from up (or unknown) to down."""
        self._last_error = exc.message
        self._last_error_at = _now()
        if self._up is not False:
            fallback = "its last good catalogue" if self._last_good is not None else "models.yaml"
            logger.warning("registry is down, using %s: %s", fallback, exc.message)
        else:
            logger.debug("registry still down: %s", exc.message)
        self._up = False

    def _registry_answered(self, specs: list[ModelSpec]) -> None:
        """Record a good fetch; log only when the registry comes up."""
        self._last_success_at = _now()
        self._last_good = specs
        if self._up is not True:
            logger.info("registry %s is up (%d models)", self._client.url, len(specs))
        self._up = True

    async def _use(self, specs: list[ModelSpec], source: CatalogueSource) -> None:
        """Make ``specs`` the catalogue in use, and tell ``on_change`` if anything changed."""
        if self._delivered is not None and self._delivered == (specs, source):
            return
        if source is not self._source:
            logger.info(
                "catalogue source %s -> %s (%d models)",
                self._source.value,
                source.value,
                len(specs),
            )
        elif self._delivered is not None:
            logger.info("catalogue from %s changed (%d models)", source.value, len(specs))
        self._specs, self._source = list(specs), source
        self._delivered = (list(specs), source)
        try:
            await self._on_change(list(specs), source)
        except Exception:
            # The catalogue's consumer failed; the poller must keep refreshing regardless.
            logger.exception("the catalogue change handler failed (source %s)", source.value)


def _now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(timezone.utc)
