"""`models pull`: a hub repository's serving files into the cache vLLM reads, with progress.

huggingface_hub does the transfer (``hf_hub_download`` per file: the cache layout vLLM reads,
file locks, retries with an HTTP Range after a dropped connection); this module decides which
files a server needs, checks the disk before the first byte, turns the library's progress bars
into events anyone can render (the CLI's rich bars, the admin route's NDJSON stream), and turns
the library's exceptions into one line an operator can act on.

Resuming: a connection dropped mid-file resumes from the last 10 MiB chunk written (the library
retries with a Range request). After Ctrl-C, a second pull skips every file already complete
in the cache; the file that was cut restarts, because huggingface_hub keeps no partial file
across processes (it writes to a process-unique temporary file and deletes it on failure).
"""

from __future__ import annotations

import fnmatch
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id

from appliance.catalogue.schema import ModelSpec
from appliance.catalogue.trust import safe_revision
from appliance.engines.factory import PACKAGE_PREFIX

# What a server never reads, even when a repository ships it: other frameworks' weights,
# exports, and Meta's original consolidated checkpoints (as big as the model itself).
SKIPPED_PATTERNS = (
    ".gitattributes",
    "original/*",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.gguf",
    "*.ot",
    "*.tflite",
)
# PyTorch pickles, needed only where a repository has no safetensors (vLLM prefers those).
PICKLED_WEIGHTS = ("*.bin", "*.pt")

EventKind = Literal["plan", "progress", "file_done", "done"]


class PullError(Exception):
    """A pull that cannot go on; ``str()`` is one line that says why and what to do."""


class LocalSourceError(PullError):
    """The entry is served from a local folder or file: nothing to pull (or to delete)."""


@dataclass(frozen=True)
class PlannedFile:
    """One file the pull needs: its path in the repository, its size, whether it is cached."""

    path: str
    size: int
    cached: bool


@dataclass(frozen=True)
class PullPlan:
    """What a pull will fetch, decided before any download starts."""

    repo_id: str
    revision: str
    commit: str
    cache_dir: Path
    files: tuple[PlannedFile, ...]
    endpoint: str

    @property
    def total_bytes(self) -> int:
        """Size of every file the model needs."""
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """Size of the files not in the cache yet: what the download costs on disk."""
        return sum(f.size for f in self.files if not f.cached)


@dataclass(frozen=True)
class PullEvent:
    """One step of a pull, as the CLI renders it and the admin route streams it (NDJSON)."""

    event: EventKind
    repo: str
    file: str | None = None
    done: int | None = None
    total: int | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data, without the fields this kind does not use."""
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


PullListener = Callable[[PullEvent], None]


@dataclass(frozen=True)
class PullTarget:
    """Where a pull fetches from and writes to: a hub id, its revision, the cache folder."""

    repo_id: str
    revision: str | None = None
    cache_dir: str | None = None


def target_for_spec(spec: ModelSpec, base_dir: Path | None = None) -> PullTarget:
    """The hub repository behind a catalogue entry, with its engine's revision and download_dir.

    vLLM reads ``revision`` and ``download_dir`` from the same engine settings, so a pull with
    them lands exactly where the engine will look.
    """
    source = getattr(spec, "source", None)  # a remote backend's entry has none
    if source is None:
        raise PullError(f"{spec.name} is a remote backend: there is nothing to pull")
    local = Path(source).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    if source.startswith(PACKAGE_PREFIX) or local.is_dir():
        raise LocalSourceError(
            f"{spec.name} is loaded from a local folder ({source}): nothing to pull"
        )
    if local.is_file():
        raise LocalSourceError(
            f"{spec.name} is loaded from a local file ({source}): nothing to pull"
        )
    engine = {key.replace("-", "_"): value for key, value in spec.engine.items()}
    revision = engine.get("revision")
    download_dir = engine.get("download_dir")
    if revision is not None and not safe_revision(revision):
        # Joined into the cache's paths (refs/<revision>): a ``..`` would leave it.
        raise PullError(
            f"{spec.name}: revision {str(revision)[:80]!r} is not a commit, branch or tag"
        )
    return PullTarget(
        repo_id=check_repo_id(source),
        revision=str(revision) if revision is not None else None,
        cache_dir=str(download_dir) if download_dir is not None else None,
    )


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the hub spells ids; a local path or anything else is a PullError."""
    if repo_id.count("/") != 1:
        raise PullError(f"{repo_id!r} is not a hub id (expected ORG/NAME)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PullError(f"{repo_id!r} is not a hub id: {exc}") from None
    return repo_id


def select_files(paths: Iterable[str]) -> list[str]:
    """The repository files a server reads: no other frameworks' weights or exports."""
    kept = [p for p in paths if not any(fnmatch.fnmatch(p, pat) for pat in SKIPPED_PATTERNS)]
    if any(p.endswith(".safetensors") for p in kept):
        kept = [p for p in kept if not any(fnmatch.fnmatch(p, pat) for pat in PICKLED_WEIGHTS)]
    return sorted(kept)


def _describe_failure(repo_id: str, exc: BaseException) -> str:
    """One line for an exception from huggingface_hub, naming the fix where there is one."""
    where = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo_id} is gated on {where}: accept its licence on the model's page, then set "
            "HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id} has no such revision on {where}"
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if _has_token() else " (if it is private, set HF_TOKEN)"
        return f"no model {repo_id} on {where}{hint}"
    if isinstance(exc, EntryNotFoundError):
        return f"{repo_id}: a listed file is missing on {where}: {_first_line(exc)}"
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return _offline(repo_id)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            return f"{where} refused the token for {repo_id} (HTTP 401): check HF_TOKEN"
        return f"{where} answered HTTP {status} for {repo_id}: {_first_line(exc)}"
    if isinstance(exc, httpx2.HTTPError):
        return f"cannot reach {where} for {repo_id}: {_first_line(exc) or type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"cannot write {repo_id} to the cache: {exc}"
    return f"pulling {repo_id} failed: {type(exc).__name__}: {_first_line(exc)}"


def _offline(repo_id: str) -> str:
    return (
        f"cannot pull {repo_id}: HF_HUB_OFFLINE is set (unset it, or point HF_ENDPOINT at a mirror)"
    )


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _free_bytes(folder: Path) -> int:
    """Free space where ``folder`` will be (its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free


def plan_pull(
    repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> PullPlan:
    """Ask the hub which files ``repo_id`` has, their sizes, and which are cached already."""
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise PullError(_offline(repo_id))
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    wanted = revision or constants.DEFAULT_REVISION
    # Read at call time, not at import: HF_ENDPOINT decides, and tests point it at a mirror.
    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint)
    try:
        commit = api.repo_info(repo_id, revision=wanted).sha
        if commit is None:
            raise PullError(f"{constants.ENDPOINT} did not say which commit {repo_id} is at")
        listing = [
            entry
            for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(entry, RepoFile)
        ]
    except PullError:
        raise
    except Exception as exc:
        raise PullError(_describe_failure(repo_id, exc)) from None
    sizes = {entry.path: entry.size for entry in listing}
    files = tuple(
        PlannedFile(
            path=path,
            size=sizes[path],
            cached=isinstance(
                try_to_load_from_cache(repo_id, path, cache_dir=cache, revision=commit), str
            ),
        )
        for path in select_files(sizes)
    )
    if not files:
        raise PullError(f"{repo_id} on {constants.ENDPOINT} has no files a server could load")
    return PullPlan(
        repo_id=repo_id,
        revision=wanted,
        commit=commit,
        cache_dir=cache,
        files=files,
        endpoint=endpoint,
    )


def check_disk(plan: PullPlan, reserve_bytes: int = 0, *, still_missing: int | None = None) -> None:
    """Refuse before the first byte (and before each later file: other writers share the
    disk) when the cache's disk cannot hold what is missing and keep ``reserve_bytes`` free
    (a full disk stops the engines' logs, the usage database and the box itself).
    ``still_missing``: bytes not fetched yet (default: all the plan's missing files)."""
    needed = plan.missing_bytes if still_missing is None else still_missing
    free = _free_bytes(plan.cache_dir)
    if needed + reserve_bytes > free:
        kept = f" and keep {format_bytes(reserve_bytes)} free" if reserve_bytes else ""
        raise PullError(
            f"not enough disk for {plan.repo_id}: it needs {format_bytes(needed)} "
            f"more{kept}, {plan.cache_dir} has {format_bytes(free)} free"
        )


def format_bytes(size: float) -> str:
    """``1.5 GB``-style sizes (decimal units, as the hub shows them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _bar_class(report: Callable[[int], None]) -> type:
    """A tqdm stand-in for one file: huggingface_hub drives it, ``report`` gets byte counts.

    The library only needs tqdm's constructor keywords, ``update`` and the context-manager
    protocol; it counts back (a negative update) when a server ignores a Range request.
    """

    class FileBar:
        def __init__(self, *_: Any, initial: int = 0, **__: Any) -> None:
            self.n = initial
            if initial:
                report(initial)

        def __enter__(self) -> FileBar:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            report(self.n)

        def close(self) -> None:
            return None

        def set_postfix_str(self, *_: Any, **__: Any) -> None:
            return None

        def refresh(self) -> None:
            return None

    return FileBar


def run_pull(
    plan: PullPlan,
    on_event: PullListener,
    *,
    cancelled: threading.Event | None = None,
    reserve_bytes: int = 0,
) -> Path:
    """Download every missing file of ``plan``, one after another; returns the snapshot folder.

    One file at a time keeps Ctrl-C immediate (no worker threads left downloading) and the
    progress readable; a single stream is what the hub's CDN serves fastest per file anyway.
    ``cancelled`` stops between files (the admin route sets it when its client goes away);
    the disk is checked before each file, keeping ``reserve_bytes`` free (``check_disk``).
    """
    check_disk(plan, reserve_bytes)
    on_event(
        PullEvent(
            "plan",
            plan.repo_id,
            done=plan.total_bytes - plan.missing_bytes,
            total=plan.total_bytes,
            files=[asdict(f) for f in plan.files],
        )
    )
    folder: str | None = None
    still_missing = plan.missing_bytes
    for planned in plan.files:
        if cancelled is not None and cancelled.is_set():
            raise PullError(f"pull of {plan.repo_id} cancelled")
        if not planned.cached:
            check_disk(plan, reserve_bytes, still_missing=still_missing)
            still_missing -= planned.size

        def report(done: int, path: str = planned.path, size: int = planned.size) -> None:
            on_event(PullEvent("progress", plan.repo_id, file=path, done=done, total=size))

        try:
            local = hf_hub_download(
                plan.repo_id,
                planned.path,
                revision=plan.commit,
                cache_dir=plan.cache_dir,
                endpoint=plan.endpoint,
                tqdm_class=_bar_class(report),  # type: ignore[arg-type]
            )
        except Exception as exc:
            raise PullError(_describe_failure(plan.repo_id, exc)) from None
        folder = str(Path(local).parents[len(Path(planned.path).parts) - 1])
        on_event(
            PullEvent(
                "file_done", plan.repo_id, file=planned.path, done=planned.size, total=planned.size
            )
        )
    assert folder is not None  # a plan always has files
    _point_ref(plan, Path(folder))
    on_event(PullEvent("done", plan.repo_id, total=plan.total_bytes, folder=folder))
    return Path(folder)


def _point_ref(plan: PullPlan, snapshot: Path) -> None:
    """Name the pulled commit by its branch or tag (``refs/main``), as the cache layout does.

    Files are fetched by commit so that a branch moving mid-pull cannot mix two revisions;
    the library writes no ref for such downloads. Written last, the ref also means "complete":
    vLLM offline, ``models list`` and the fetcher find the snapshot through it.
    """
    if plan.revision == plan.commit:
        return
    ref = snapshot.parents[1] / "refs" / plan.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.tmp")
    temporary.write_text(plan.commit)
    temporary.replace(ref)
