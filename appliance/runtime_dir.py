"""The appliance's runtime directory: one 0700 folder for its sockets, and the leftovers of
appliances that were killed.

Its sockets (the workers' control channel, the owner's private HTTP socket, vLLM's ZMQ IPC
sockets through ``VLLM_RPC_BASE_PATH``) live in a directory only this user may enter, made
with ``mkdtemp`` (mode 0700) as ``$TMPDIR/appliance-XXXXXXXX``. The owner holds an ``flock``
on ``owner.lock`` inside it for as long as it runs; the kernel lets go when the process dies,
however it dies, so at the next start a folder whose lock can be taken is a dead appliance's,
and is removed. Only folders of this user, named ``appliance-*``, are looked at. Folders from
before the lock (no ``owner.lock``) are removed only when the folder is a minute old and
holds nothing but sockets nobody listens on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

log = logging.getLogger("appliance")

PREFIX = "appliance-"
LOCK_NAME = "owner.lock"
LEGACY_MIN_AGE_SECONDS = 60.0


class RuntimeDir:
    """A 0700 directory of this process's, held (locked) until :meth:`close`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, base: Path | None = None) -> RuntimeDir:
        """Remove dead appliances' directories under ``base`` (default: the temp folder),
        then make and lock a new one."""
        base = base or Path(tempfile.gettempdir())
        for stale in clean_stale(base):
            log.info("removed a stale runtime directory", extra={"path": str(stale)})
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, fd)

    def close(self) -> None:
        """Remove the directory and everything in it; let go of the lock."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None


def clean_stale(base: Path, *, now: float | None = None) -> list[Path]:
    """Remove the runtime directories under ``base`` that are this user's and whose owner
    is dead; returns those removed."""
    removed: list[Path] = []
    now = time.time() if now is None else now
    for entry in sorted(base.glob(PREFIX + "*")):
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue  # a link, a file, or someone else's: not ours to judge
        if _owner_alive(entry, info.st_mtime, now):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _owner_alive(path: Path, mtime: float, now: float) -> bool:
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _legacy_alive(path, mtime, now)
    except OSError:
        return True  # unreadable, a link: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # its owner holds it
    finally:
        os.close(fd)  # closing lets go of a lock taken here
    return False


def _legacy_alive(path: Path, mtime: float, now: float) -> bool:
    """A directory made before ``owner.lock``: dead when it is a minute old and holds only
    sockets that refuse connections."""
    if now - mtime < LEGACY_MIN_AGE_SECONDS:
        return True
    try:
        entries = list(path.iterdir())
    except OSError:
        return True
    for entry in entries:
        try:
            if not stat.S_ISSOCK(entry.lstat().st_mode):
                return True  # not what an appliance leaves: leave it
        except OSError:
            return True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(entry))
            except (ConnectionRefusedError, FileNotFoundError):
                continue
            except OSError:
                return True
            with contextlib.suppress(OSError):
                probe.shutdown(socket.SHUT_RDWR)
            return True  # someone listens
    return False
