"""Writing files so that a crash or a full disk never leaves a half-written one in place.

The one atomic writer of the package: write to a hidden temporary file beside the target, flush it
to disk, then rename it over the target. A failure leaves the previous file untouched and removes
the temporary; a full disk is reported as such, naming the file. Only a regular file (or nothing) is
ever replaced: a symlink, a device, a FIFO or a folder at the target is refused, so a path from a
received run folder or a careless ``--out`` cannot redirect a write. A whole folder is replaced as one
unit by `replace_dir` (an atomic exchange where the kernel offers one). Also here: the readers of what a user
gives (JSON, JSON lines: only regular files, sizes bounded, every problem named with the file) and the checksummed
manifest that marks a folder complete. The exclusive lock of a folder is `orchmoe.utils.folder_lock`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "replace_dir",
    "recover_dir",
    "UnsafePathError",
    "check_replaceable",
    "atomic_write_text",
    "atomic_torch_save",
    "append_lines",
    "fsync_tree",
    "fsync_dir",
    "atomic_folder",
    "DiskFullError",
    "reporting_disk_full",
    "is_disk_full",
    "sha256_file",
    "read_json",
    "read_json_lines",
    "check_regular_file",
    "manifest_files",
    "FileFormatError",
    "MAX_JSON_BYTES",
    "write_manifest",
    "verify_manifest",
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


class UnsafePathError(OSError):
    """A write refused because its target is not a regular file or folder of its own (a link, a device, ...)."""

    def __str__(self) -> str:
        return str(self.strerror)


_KINDS = {
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "folder",
    stat.S_IFREG: "regular file",
}


def path_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path`` without following a link ("regular file", "folder", "symbolic link", ...), or None."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def check_replaceable(target: str | os.PathLike, want: str = "regular file") -> None:
    """Raise `UnsafePathError` unless ``target`` is absent or a ``want`` ("regular file" or "folder") itself."""
    kind = path_kind(target)
    if kind is not None and kind != want:
        raise UnsafePathError(
            errno.EEXIST, f"{target} is a {kind}, not a {want}: refusing to write over it (choose another path)"
        )


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``target`` (absent or a regular file)."""
    target = Path(target)
    check_replaceable(target)
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


def append_lines(target: str | os.PathLike, lines: list[str]) -> None:
    """Append whole lines to a journal file and flush them to disk: one ``write`` of complete lines, so a
    kill leaves at most one torn last line, which its reader drops (``orchmoe predict`` resumes this way)."""
    if not lines:
        return
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    with reporting_disk_full(target):
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(target: str | os.PathLike, obj: Any) -> Path:
    """`torch.save` through a Python file object, so a full disk arrives as an OSError (ENOSPC) rather than
    torch's own "unexpected pos" or "iostream error"."""
    import torch

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(target, write)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder ``new`` at ``target`` as one unit, replacing the folder there.

    Flushed first; then an atomic exchange of the two folders where the kernel offers it, so a kill at any
    moment leaves the old folder or the new one at ``target``. Elsewhere two renames, with the old folder
    parked as ``.<name>.old`` in between (`recover_dir` puts it back if a kill fell between them).

    Raises:
        UnsafePathError: ``target`` is not a folder (a file, a link, ...).
    """
    new, target = Path(new), Path(target)
    check_replaceable(target, "folder")
    fsync_tree(new)
    if path_kind(target) is None:
        os.rename(new, target)
    elif _exchange(new, target):
        _discard(new)  # now the old folder
    else:
        parked = target.with_name(f".{target.name}.old")
        if parked.exists():
            shutil.rmtree(parked)
        os.rename(target, parked)
        os.rename(new, target)
        shutil.rmtree(parked)
    fsync_dir(target.parent)
    return target


def recover_dir(target: str | os.PathLike) -> None:
    """Undo a `replace_dir` cut between its two renames: the parked old folder back at ``target``."""
    target = Path(target)
    parked = target.with_name(f".{target.name}.old")
    if path_kind(target) is None and path_kind(parked) == "folder":
        os.rename(parked, target)


def _discard(folder: Path) -> None:
    """Delete a folder that was just swapped out of place, marked first and the mark deleted last: a kill during
    the deletion leaves a marked partial that the next `atomic_folder` sweeps, not an orphan."""
    (folder / _PARTIAL_MARK).touch()
    for child in folder.iterdir():
        if child.name != _PARTIAL_MARK:
            shutil.rmtree(child) if path_kind(child) == "folder" else child.unlink()
    shutil.rmtree(folder)


def fsync_tree(path: Path) -> None:
    """Flush a freshly written folder (every file, then the folder) before it is renamed into place."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_file(p)
    fsync_dir(path)


_PARTIAL_MARK = ".orchmoe-partial"  # inside a folder `atomic_folder` is still writing


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
    """Write a whole folder as one unit: the one way orchmoe (re)places a folder (adapters, exports, bundles).

    Yields an empty hidden sibling (``.NAME.partial-PID``) to fill; on a clean exit it is flushed and put at
    ``target`` by `replace_dir` (an atomic exchange where the kernel offers it), so ``target`` is the old folder
    or the new one at every moment. On an error the sibling is deleted; a killed process leaves only the hidden
    sibling, which the next `atomic_folder` for the same target deletes once that process is gone. The caller
    decides whether an existing folder may be replaced.

    Args:
        target: the folder to (re)place.
    Yields:
        The folder to write into.
    Raises:
        UnsafePathError: ``target`` is not a folder (a file, a link, a FIFO, ...).
    """
    target = Path(target)
    check_replaceable(target, "folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if path_kind(p) == "folder" and (p / _PARTIAL_MARK).is_file() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    (stage / _PARTIAL_MARK).touch()
    try:
        with reporting_disk_full(target):
            yield stage
            fsync_tree(stage)  # the slow part while the mark still says "partial": a kill here leaves a swept stage
            (stage / _PARTIAL_MARK).unlink()
            replace_dir(stage, target)
    finally:
        if path_kind(stage) is not None:
            shutil.rmtree(stage, ignore_errors=True)


# -- reading -----------------------------------------------------------------------------------

#: the largest JSON file orchmoe reads (configs, manifests, metrics: kilobytes in practice)
MAX_JSON_BYTES = 64 << 20


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be (not UTF-8, not JSON, nested too deeply, too large)."""


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file (or a link to one): a FIFO would block a reader, a device never end.

    Raises:
        FileNotFoundError: nothing at ``path``.
        FileFormatError: something else than a file there (named: a folder, a FIFO, a device, ...).
    """
    path = Path(path)
    kind = path_kind(path)
    if kind is None:
        raise FileNotFoundError(f"no {what} at {path}")
    if kind != "regular file" and not (kind == "symbolic link" and path.is_file()):
        target = f" (a link to a {_target_kind(path)})" if kind == "symbolic link" else ""
        raise FileFormatError(f"{path} is a {kind}{target}, not a {what}")
    return path


def _target_kind(link: Path) -> str:
    try:
        return _KINDS.get(stat.S_IFMT(os.stat(link).st_mode), "special file")
    except OSError:
        return "missing target"


def _read_regular(path: Path, what: str, max_bytes: int) -> bytes:
    check_regular_file(path, what)
    size = path.stat().st_size
    if size > max_bytes:
        raise FileFormatError(f"{path} is {size:,} bytes, over the {max_bytes:,} bytes a {what} may have")
    return path.read_bytes()


def read_json_lines(
    path: str | os.PathLike, what: str = "JSON lines file", max_bytes: int = 1 << 30
) -> list[tuple[int, dict]]:
    """The rows of a JSON-lines file with their line numbers (blank lines skipped), each a JSON object; any way
    the file is unreadable is a `FileFormatError` naming the file and the line (the one reader of the jsonl files
    a user gives orchmoe).

    Raises:
        FileNotFoundError: nothing at ``path``.
        FileFormatError: not a regular file, too large, not UTF-8, a line that is not JSON or not an object.
    """
    path = Path(path)
    data = _read_regular(path, what, max_bytes)
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise FileFormatError(f"{path} line {n}: not UTF-8 text (byte {e.start}): not a {what}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{path} line {n}: not valid JSON ({e.msg}): not a {what}") from None
        except RecursionError:
            raise FileFormatError(f"{path} line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise FileFormatError(f"{path} line {n}: a row must be a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``; any way the file is unreadable is a `FileFormatError` naming it.

    Only a regular file is read (a FIFO would block, a device would never end); its size is bounded; invalid
    UTF-8, invalid JSON and nesting too deep for the parser each say so with the file's name.

    Raises:
        FileNotFoundError: nothing at ``path``.
        FileFormatError: anything else that keeps it from being read.
    """
    path = Path(path)
    data = _read_regular(path, what, max_bytes)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not valid UTF-8 text (byte {e.start}): not a {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): not a {what}") from None
    except RecursionError:
        raise FileFormatError(f"{path} nests its JSON too deeply to be a {what}") from None


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


def manifest_files(folder: str | os.PathLike, name: str = "manifest.json") -> dict[str, Any]:
    """The file list of ``folder/name``: relative paths inside ``folder`` mapped to their recorded size and sha256.

    A manifest comes with a folder that may have been received from anyone: an entry that is absolute or climbs
    out with ``..`` would make a check read, or a clean-up delete, a file outside the folder, so it is refused.

    Raises:
        FileNotFoundError: no manifest.
        FileFormatError: unreadable, not a manifest, or an entry outside the folder.
    """
    path = Path(folder) / name
    manifest = read_json(path, "manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise FileFormatError(f"{path} has no file list")
    for rel in files:
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
            raise FileFormatError(f"{path} names {rel!r}, a path outside its folder: not an orchmoe manifest")
    return files


def verify_manifest(folder: str | os.PathLike, name: str = "manifest.json") -> str | None:
    """None when every file of ``folder/name`` is present with its size and checksum, else what is wrong."""
    folder = Path(folder)
    try:
        files = manifest_files(folder, name)
    except FileNotFoundError:
        return f"no {name}"
    except FileFormatError as e:
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
