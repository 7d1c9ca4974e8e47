"""``data`` -> a :class:`TaskSource`: the one place that decides which format a data argument is.

Order: a :class:`TaskSource` is used as is; ``"builtin"`` (unless a folder of that name exists) is
the embedded dataset; an existing folder with ``tasks/`` is the official SuperNI layout; any other
existing file or folder is read with ``datasets`` (:mod:`orchmoe.data.tables`); ``owner/name`` that
is not a local path is a hub dataset id. Opened tables are kept (a few, keyed by the files' sizes
and modification times), so reopening the same data in one process, e.g. for each task of an
analysis, does not read it again.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from orchmoe.data.core import BUILTIN, DataError, PathLike, TaskSource, names_builtin
from orchmoe.data.superni import FolderSource, is_superni_dir
from orchmoe.utils.fileio import path_kind

_OPEN: OrderedDict[tuple, TaskSource] = OrderedDict()
_KEEP = 4


def _signature(path: Path) -> tuple:
    from orchmoe.data.reading import data_files

    files = [path] if path.is_file() else data_files(path)
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


def _remember(key: tuple, make) -> TaskSource:
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    source = make()
    _OPEN[key] = source
    while len(_OPEN) > _KEEP:
        _OPEN.popitem(last=False)
    return source


def open_source(data: Any, *, task_column: str | None = None, cache_dir: PathLike | None = None) -> TaskSource:
    """The :class:`TaskSource` for ``data``.

    Args:
        data: a :class:`TaskSource`, ``"builtin"``, a folder in the official layout, a data file or
            folder (``.jsonl``/``.json``/``.parquet``, or ``Dataset.save_to_disk`` output), or a hub
            dataset id ``owner/name``; see :mod:`orchmoe.data.tables` for the table formats.
        task_column: the column naming each row's task (default: ``task_name`` or ``task`` when present).
        cache_dir: ``datasets`` cache folder for reading tables (default: the ``datasets`` default,
            ``$HF_DATASETS_CACHE``).

    Returns:
        The source; raises :class:`DataError` when ``data`` is none of the above.
    """
    if isinstance(data, TaskSource):
        return data
    if names_builtin(data):
        return FolderSource(BUILTIN)
    path = Path(data).expanduser()
    if path.exists():
        if not (path.is_dir() or path.is_file()):  # a FIFO would block the reader, a device never end
            raise DataError(f"{str(path)!r} is a {path_kind(path)}, not a data folder or file")
        if is_superni_dir(path):
            return FolderSource(path)
        from orchmoe.data.reading import parts_from_path
        from orchmoe.data.tabular import TableSource

        key = ("path", str(path.resolve()), task_column, str(cache_dir), _signature(path))
        return _remember(
            key,
            lambda: TableSource(
                parts_from_path(path, cache_dir, task_column),
                path,
                task_column=task_column,
                split_root=path if path.is_dir() else None,
            ),
        )
    from orchmoe.data.reading import BUILDERS, HUB_ID, parts_from_hub
    from orchmoe.data.tabular import TableSource

    text = str(data)
    if HUB_ID.match(text) and path.suffix.lower() not in BUILDERS:
        key = ("hub", text, task_column, str(cache_dir))
        return _remember(key, lambda: TableSource(parts_from_hub(text, cache_dir), text, task_column=task_column))
    raise DataError(
        f"data {text!r} does not exist: it is no file or folder here, not {BUILTIN!r}, "
        "and not a hub dataset id (owner/name)"
    )
