"""Writing files so that a crash or a full disk never leaves a half-written one in place.

The one atomic writer of the package: write to a hidden temporary file beside the target, flush it
to disk, then rename it over the target. A failure leaves the previous file untouched and removes
the temporary; a full disk is reported as such, naming the file.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text", "fsync_tree", "DiskFullError", "cache_root", "CACHE_ENV"]

CACHE_ENV = "ORCHMOE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of orchmoe's cache (converted models, tokenised features, the builtin data):
    ``cache_dir`` > ``$ORCHMOE_CACHE`` > ``~/.cache/orchmoe``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "orchmoe"


class DiskFullError(OSError):
    """No space left on the device while writing a named file."""


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
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if e.errno == errno.ENOSPC or "No space left" in str(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {target}") from e
        raise
    except RuntimeError as e:  # torch/safetensors report a full disk as their own errors
        if "iostream error" in str(e) or "No space left" in str(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {target}") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def fsync_tree(path: Path) -> None:
    """Flush a freshly written folder (every file, then the folder) before it is renamed into place."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    fsync_dir(path)
