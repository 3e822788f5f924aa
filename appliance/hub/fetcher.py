"""The supervisor's fetcher: the ``downloading`` step before ``loading``.

For a hub model it pulls with the same code as `appliance models pull` (``appliance.hub.pull``),
so a load on demand and an operator's pull fill the same cache the same way. For a ``.gguf``
source it converts the file into the conversion cache (``appliance.hub.gguf``), shown as the
``converting`` activity of the same step.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

from huggingface_hub import constants

from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.engines.factory import resolve_source
from appliance.errors import ConfigError, ModelDownloadFailedError
from appliance.host.downloads import DownloadProgress
from appliance.hub.disk import loadable
from appliance.hub.gguf import GgufCache, is_gguf
from appliance.hub.pull import PullError, PullEvent, plan_pull, run_pull, target_for_spec

COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubFetcher:
    """Finds hub models whose files are missing and downloads them, with progress."""

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        reserve_bytes: int = 0,
        gguf: GgufCache | None = None,
    ) -> None:
        """``base_dir``: the catalogue's folder (relative local sources are taken from it);
        ``reserve_bytes``: disk a pull leaves free; ``gguf``: where ``.gguf`` sources are
        converted (None: they are not, and vLLM is handed the file)."""
        self._base_dir = base_dir
        self._reserve_bytes = reserve_bytes
        self._gguf = gguf

    def _gguf_file(self, spec: ModelSpec) -> Path | None:
        """The ``.gguf`` file ``spec`` is served from, if it is."""
        if self._gguf is None or not isinstance(spec, LocalModelSpec) or not is_gguf(spec.source):
            return None
        try:
            return Path(resolve_source(spec, self._base_dir))
        except ConfigError:
            return None  # the engine's start says what is wrong

    def missing(self, spec: ModelSpec) -> bool:
        """A hub model with no loadable snapshot at its revision in the cache (never when the
        hub is off: HF_HUB_OFFLINE, vLLM then says itself what is missing), or any ``.gguf``
        source: whether it is converted already takes its hash, which ``fetch`` computes off
        the event loop (and returns at once when it is)."""
        if self._gguf_file(spec) is not None:
            return True
        if constants.HF_HUB_OFFLINE:
            return False
        try:
            target = target_for_spec(spec, self._base_dir)
        except PullError:
            return False  # a local folder, a package, a remote backend
        cache = Path(target.cache_dir or constants.HF_HUB_CACHE).expanduser()
        root = cache / ("models--" + target.repo_id.replace("/", "--"))
        revision = target.revision or constants.DEFAULT_REVISION
        if COMMIT.match(revision):
            commit = revision
        else:
            try:
                commit = (root / "refs" / revision).read_text().strip()
            except OSError:
                return True
        snapshot = root / "snapshots" / commit
        return not (snapshot.is_dir() and loadable(snapshot))

    async def fetch(self, spec: ModelSpec, progress: DownloadProgress) -> None:
        """Plan and pull ``spec``'s files; a cancelled load stops the pull between files. A
        ``.gguf`` source is converted instead (a cancelled load kills the conversion)."""
        gguf_file = self._gguf_file(spec)
        if gguf_file is not None and self._gguf is not None:
            await self._convert(spec, gguf_file, progress)
            return
        cancelled = threading.Event()
        per_file: dict[str, int] = {}

        def count(event: PullEvent) -> None:
            if event.event in ("progress", "file_done") and event.file is not None:
                per_file[event.file] = event.done or 0
                progress.done_bytes = progress.cached_bytes + sum(per_file.values())

        def work() -> None:
            target = target_for_spec(spec, self._base_dir)
            plan = plan_pull(target.repo_id, revision=target.revision, cache_dir=target.cache_dir)
            progress.total_bytes = plan.total_bytes
            progress.cached_bytes = progress.done_bytes = plan.total_bytes - plan.missing_bytes
            run_pull(plan, count, cancelled=cancelled, reserve_bytes=self._reserve_bytes)

        try:
            await asyncio.to_thread(work)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except PullError as exc:
            raise ModelDownloadFailedError(
                f"model {spec.name!r}: downloading its files failed: {exc}"
            ) from None

    async def _convert(self, spec: ModelSpec, gguf_file: Path, progress: DownloadProgress) -> None:
        assert self._gguf is not None
        progress.activity = "converting"
        progress.total_bytes = gguf_file.stat().st_size
        progress.detail = "hashing the file"
        await asyncio.to_thread(self._gguf.digest, gguf_file)

        def report(step: str) -> None:
            progress.detail = step

        await self._gguf.convert(spec.name, gguf_file, report)
        progress.done_bytes = progress.total_bytes
        progress.detail = "converted"
