"""What a catalogue entry has on disk, and freeing a hub model's files from the cache.

Hub models live in huggingface_hub's cache (``models--ORG--NAME`` under ``HF_HUB_CACHE`` or an
entry's ``download_dir``), read with the library's own cache scanner and deleted with its own
deletion strategy, so blobs shared between revisions are handled as the library intends.
Local folders are reported but never deleted: they are the operator's files, not a cache.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CachedRepoInfo, constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from appliance.catalogue.schema import ModelSpec
from appliance.hub.gguf import is_gguf
from appliance.hub.pull import PACKAGE_PREFIX, PullError, PullTarget, target_for_spec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class FilesOnDisk:
    """A model's files: whether a loadable set is there, their size, and where."""

    present: bool
    size_bytes: int
    location: str | None
    removable: bool  # a hub cache entry (``models rm`` frees it), not an operator's folder


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def loadable(folder: Path) -> bool:
    """A config and every weight file: all shards an index names, or at least one file."""
    if not (folder / "config.json").is_file():
        return False
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                return False
            return all((folder / shard).is_file() for shard in shards)
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def cached_repo(target: PullTarget) -> CachedRepoInfo | None:
    """The library's view of one repository in the cache, if it is there."""
    cache = Path(target.cache_dir or constants.HF_HUB_CACHE).expanduser()
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return None
    return next(
        (r for r in info.repos if r.repo_type == "model" and r.repo_id == target.repo_id), None
    )


def _snapshot(repo: CachedRepoInfo, revision: str | None) -> Path | None:
    wanted = revision or constants.DEFAULT_REVISION
    for rev in repo.revisions:
        if wanted in rev.refs or rev.commit_hash == wanted:
            return Path(rev.snapshot_path)
    return None


def files_on_disk(spec: ModelSpec, base_dir: Path | None = None) -> FilesOnDisk:
    """What ``spec`` has on disk: a hub entry's cached files, or its local folder."""
    try:
        target = target_for_spec(spec, base_dir)
    except PullError:
        return _local_files(spec, base_dir)
    repo = cached_repo(target)
    if repo is None:
        return FilesOnDisk(present=False, size_bytes=0, location=None, removable=True)
    snapshot = _snapshot(repo, target.revision)
    return FilesOnDisk(
        present=snapshot is not None and loadable(snapshot),
        size_bytes=repo.size_on_disk,
        location=str(repo.repo_path),
        removable=True,
    )


def _local_files(spec: ModelSpec, base_dir: Path | None) -> FilesOnDisk:
    source = getattr(spec, "source", None)
    if source is None or source.startswith(PACKAGE_PREFIX):
        # Remote backends hold nothing here; a package's model is part of its install.
        return FilesOnDisk(present=source is not None, size_bytes=0, location=None, removable=False)
    folder = Path(source).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if is_gguf(source) and folder.is_file():
        # A GGUF file: its converted folder is a cache the appliance remakes when it is gone.
        size = folder.stat().st_size
        return FilesOnDisk(present=True, size_bytes=size, location=str(folder), removable=False)
    if not folder.is_dir():
        return FilesOnDisk(present=False, size_bytes=0, location=str(folder), removable=False)
    return FilesOnDisk(
        present=loadable(folder),
        size_bytes=_folder_bytes(folder),
        location=str(folder),
        removable=False,
    )


def remove_from_cache(target: PullTarget) -> int:
    """Delete every cached revision of ``target``'s repository; the bytes freed (0: none)."""
    repo = cached_repo(target)
    if repo is None:
        return 0
    if repo.revisions:
        cache = Path(target.cache_dir or constants.HF_HUB_CACHE).expanduser()
        hashes = (r.commit_hash for r in repo.revisions)
        scan_cache_dir(cache).delete_revisions(*hashes).execute()
    # With every revision gone the library removes the folder; what an interrupted pull left
    # without any snapshot (blobs, locks) goes with it here.
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return repo.size_on_disk
