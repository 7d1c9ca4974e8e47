"""Where an export may write.

An existing destination that is not empty is refused unless the caller allows overwriting, and even then
only when it holds an earlier orchmoe export: ``--overwrite`` never deletes a folder orchmoe did not write.
The adapter being exported is never inside, around or equal to the destination. The export itself is
written whole or not at all (`orchmoe.fileio.atomic_folder`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..export import EXPORT_NOTE
from .names import BUNDLE_FORMAT, MANIFEST, BundleError

__all__ = ["check_destination"]


def _is_export(folder: Path) -> bool:
    """A folder orchmoe wrote as an export: a bundle (its manifest) or one exported LoRA (its note)."""
    if (folder / EXPORT_NOTE).is_file():
        return True
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_destination(out: str | os.PathLike, *, overwrite: bool, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse a destination that would destroy something; return it resolved.

    Args:
        out: the folder to write.
        overwrite: replace an earlier orchmoe export there.
        protect: folders that must stay untouched (the adapter exported): the destination may be none of them,
            inside none and contain none.
    Returns:
        The absolute destination.
    Raises:
        BundleError: a protected folder in the way, a file there, or a non-empty folder that may not be replaced.
    """
    dest = Path(out).expanduser().resolve()
    for folder in protect:
        kept = Path(folder).expanduser().resolve()
        if _related(dest, kept):
            if dest == kept:
                what = "the adapter folder itself"
            elif dest.is_relative_to(kept):
                what = f"inside the adapter folder {kept}"
            else:
                what = f"a folder around the adapter folder {kept}"
            raise BundleError(
                f"refusing to export into {dest}: it is {what}, which the export reads and must not change; "
                "choose another folder"
            )
    if dest.exists() and not dest.is_dir():
        raise BundleError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise BundleError(f"{dest} exists and is not empty: pass --overwrite to replace an earlier export there")
        if not _is_export(dest):
            raise BundleError(
                f"{dest} holds files that are not an orchmoe export; --overwrite only replaces an earlier export "
                "(choose another folder, or empty it yourself)"
            )
    return dest
