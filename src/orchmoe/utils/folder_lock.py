"""The exclusive lock of a folder (a run folder while a command writes into it): a `fcntl.flock` on a lock file
that never follows a link, so a lock file planted as a link cannot make orchmoe truncate what it points to."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
import warnings
from pathlib import Path

from orchmoe.utils.fileio import UnsafePathError, path_kind, reporting_disk_full

__all__ = ["FolderLock", "FolderLockedError"]


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive `fcntl.flock` on a lock file, holding the holder's pid, host and start time.

    The kernel drops the lock when the holder exits, however it exits (a SIGKILL included), so a stale
    lock file never blocks anyone. On a filesystem without locks it warns and carries on unlocked.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str) -> None:
        """Take the lock or raise `FolderLockedError` naming ``what`` and the holder."""
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system
            warnings.warn(f"cannot lock {what} on this platform: do not run two trainings into it", stacklevel=2)
            return
        try:  # never through a link: a lock file linking elsewhere must not truncate its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as e:
            raise UnsafePathError(
                errno.ELOOP,
                f"cannot lock {what}: {self.path} is a {path_kind(self.path) or 'path that cannot be opened'} "
                f"({e.strerror}); orchmoe's lock file must be a regular file it created (remove it)",
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(
                errno.EEXIST, f"cannot lock {what}: {self.path} is not a regular file (remove it and start again)"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderLockedError(
                f"{what} is in use by another orchmoe run ({holder}); wait for it to finish, or use another --out"
            ) from None
        except OSError as e:  # pragma: no cover - e.g. a network filesystem without flock
            os.close(fd)
            warnings.warn(f"cannot lock {what} ({e}): do not run two trainings into it", stacklevel=2)
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with reporting_disk_full(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __del__(self) -> None:  # a lock object dropped without release() does not keep the folder locked
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no stale holder shown to the next one
        except OSError:  # pragma: no cover
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its pid is not recorded yet"
