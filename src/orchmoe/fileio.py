"""Writing files so that a crash or a full disk never leaves a half-written one in place.

The one atomic writer of the package: write to a hidden temporary file beside the target, flush it
to disk, then rename it over the target. A failure leaves the previous file untouched and removes
the temporary; a full disk is reported as such, naming the file. Also here: the checksummed
manifest that marks a folder complete, and the exclusive lock of a folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_torch_save",
    "fsync_tree",
    "fsync_dir",
    "atomic_folder",
    "DiskFullError",
    "reporting_disk_full",
    "is_disk_full",
    "sha256_file",
    "write_manifest",
    "verify_manifest",
    "FolderLock",
    "FolderLockedError",
    "cache_root",
    "CACHE_ENV",
]

CACHE_ENV = "ORCHMOE_CACHE"
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_WORDS = ("No space left", "os error 28", "Disk quota exceeded", "iostream error")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of orchmoe's cache (converted models, tokenised features, the builtin data):
    ``cache_dir`` > ``$ORCHMOE_CACHE`` > ``~/.cache/orchmoe``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "orchmoe"


class DiskFullError(OSError):
    """No space left on the device while writing a named file."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an error it wraps) is a full disk or quota: torch and safetensors wrap the OSError
    in their own errors, torch keeping it as the context of a RuntimeError."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in _FULL_ERRNOS or any(w in str(e) for w in _FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def reporting_disk_full(target: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full disk met inside the block as `DiskFullError` naming ``target``; other errors pass."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - only a full disk is translated
        if is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {target}") from e
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some systems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``target``."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with reporting_disk_full(target):
            write(tmp)
            _fsync_file(tmp)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_torch_save(target: str | os.PathLike, obj: Any) -> Path:
    """`torch.save` through a Python file object, so a full disk arrives as an OSError (ENOSPC) rather than
    torch's own "unexpected pos" or "iostream error"."""
    import torch

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(target, write)


def fsync_tree(path: Path) -> None:
    """Flush a freshly written folder (every file, then the folder) before it is renamed into place."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    fsync_dir(path)


_PARTIAL_MARK = ".orchmoe-partial"  # inside a folder still being written by atomic_folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's live process
        return True
    return True


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder: yield an empty hidden sibling (``.NAME.partial-PID``) to fill; on a clean exit it is
    flushed and renamed onto `target`, replacing a folder there (so `target` is a whole folder at every moment:
    the old one until the rename, then the new one). On an error the sibling is deleted; a killed process leaves
    only the hidden sibling, which the next `atomic_folder` for the same target deletes once its process is gone.

    Args:
        target: the folder to (re)place; the caller decides whether an existing one may be replaced.
    Yields:
        The folder to write into.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and (p / _PARTIAL_MARK).is_file() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    (stage / _PARTIAL_MARK).touch()
    try:
        with reporting_disk_full(target):
            yield stage
            (stage / _PARTIAL_MARK).unlink()
            fsync_tree(stage)
            old = target.parent / f".{target.name}.replaced-{os.getpid()}" if target.exists() else None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(stage, target)
            fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# -- manifests: what a complete folder holds ---------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, name: str = "manifest.json") -> dict[str, dict[str, Any]]:
    """List every file under ``folder`` with its size and sha256 in ``folder/name`` (written last: its
    presence says the folder is complete, its checksums say it is intact)."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != name
    }
    atomic_write_text(folder / name, json.dumps({"format": "orchmoe-manifest", "files": files}, indent=1))
    return files


def verify_manifest(folder: str | os.PathLike, name: str = "manifest.json") -> str | None:
    """None when every file of ``folder/name`` is present with its size and checksum, else what is wrong."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / name).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no file list")
    except FileNotFoundError:
        return f"no {name}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{name} is unreadable ({e})"
    for rel, want in files.items():
        p = folder / rel
        if not isinstance(want, dict) or not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, {want.get('size')} were written (truncated?)"
        if sha256_file(p) != want.get("sha256"):
            return f"{rel} does not match its checksum (corrupted)"
    return None


# -- an exclusive lock on a folder -------------------------------------------------------------


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
