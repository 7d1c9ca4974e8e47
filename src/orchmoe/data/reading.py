"""Reading data files, ``save_to_disk`` folders and hub datasets into tables with ``datasets``.

How files are read, and why:

* up to :data:`PER_FILE_LIMIT` files of a format go through one ``load_dataset`` call with each file
  as its own split (one cache, and every row keeps its file, so messages name the file and row);
* more files (e.g. the ~1600 per-task files of ``Muennighoff/natural-instructions``) go through one
  call with one split per ``train``/``test`` folder: ``datasets`` keeps one copy of the split
  metadata per dataset, so thousands of splits would cost quadratic time. Rows then name their task
  only; messages name the file called after the task (``<task>.jsonl``, ``<task>_train.jsonl``), which
  is the file that holds them in that layout. This needs a task column; without one, or when the files
  do not share their columns, every file is read by its own call (slower, exact);
* when reading together fails (a broken file, different columns), files are read one by one, so the
  error names its file. One ``load_dataset`` call also gives every file the first file's columns,
  filling the ones a file lacks with nulls; such a file is read again alone to see its own columns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchmoe.data.columns import TASK_COLUMNS
from orchmoe.data.core import DataError, PathLike

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_FOLDERS = ("train", "test")
PER_FILE_LIMIT = 64
_SHARD = re.compile(r"^(?P<split>[A-Za-z]+)-\d+-of-\d+$")  # hub parquet export: data/train-00000-of-00001
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Part:
    """One table: a file's rows, several files read together, or one split of a hub dataset."""

    dataset: Any  # datasets.Dataset
    origin: str  # for messages: the file, the folder, or "<id> [split]"
    part: str | None  # "train", "test" or None (no split information)
    default_task: str | None  # the task of every row when the table has no task column
    files: tuple[Path, ...] = ()
    task_files: dict[str, Path] = field(default_factory=dict)  # several files: task -> the file named after it

    @property
    def path(self) -> Path | None:
        return self.files[0] if len(self.files) == 1 else None

    def locate(self, task: str, rows: Sequence[int]) -> tuple[str, Sequence[int], Path | None]:
        """(origin, row numbers, file) to name ``task``'s rows (0-based ``rows`` of this table) in messages."""
        if len(self.files) <= 1:
            return self.origin, rows, self.path
        f = self.task_files.get(task)
        if f is not None:
            return str(f), range(len(rows)), f
        return f"{self.origin} (rows counted within task {task!r})", range(len(rows)), None


@contextmanager
def quiet_datasets():
    """No progress bars or info logs from ``datasets`` while reading (restored afterwards)."""
    from datasets import utils as ds_utils
    from datasets.utils import logging as ds_logging

    was_disabled = ds_utils.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    ds_utils.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not was_disabled:
            ds_utils.enable_progress_bars()


def root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --------------------------------------------------------------------------------------------
# Files


def data_files(folder: Path) -> list[Path]:
    """Data files under ``folder`` (recursive, sorted; hidden folders and ``splits/`` skipped)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(s.startswith(".") for s in rel) or rel[0] == "splits" or not p.is_file():
            continue
        if p.suffix.lower() in BUILDERS:
            out.append(p)
    return out


def file_part(path: Path, folder: Path | None) -> tuple[str | None, str | None]:
    """(split part, default task name) of a file: from a ``train/``/``test/`` ancestor folder or a
    shard name, and the file stem less a ``_<split>`` suffix."""
    shard = _SHARD.match(path.stem)
    if shard:
        return ("test" if shard["split"] == "test" else "train"), None
    part = None
    if folder is not None:
        part = next((d for d in reversed(path.relative_to(folder).parts[:-1]) if d in SPLIT_FOLDERS), None)
    stem = path.stem
    if part is not None and stem.endswith(f"_{part}") and len(stem) > len(part) + 1:
        stem = stem[: -len(part) - 1]
    return part, stem


def _has_null_column(ds: Any) -> bool:
    return len(ds) > 0 and any(col.null_count == len(ds) for col in ds.data.columns)


def _one_file(builder: str, f: Path, cache: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(f), split="train", cache_dir=cache)
    except Exception as e:
        kind = "JSON / JSON lines" if builder == "json" else builder
        raise DataError(f"{f}: cannot be read as {kind} ({root_cause(e)})") from e


def _file_parts(builder: str, files: Sequence[Path], folder: Path | None, cache: str | None) -> list[Part]:
    """One part per file (each file its own split of one call while there are few)."""
    import datasets

    tables: list[Any] = [None] * len(files)
    alone = range(len(files))
    if 1 < len(files) <= PER_FILE_LIMIT:
        try:
            dd = datasets.load_dataset(
                builder, data_files={f"f{i:05d}": str(f) for i, f in enumerate(files)}, cache_dir=cache
            )
            tables = [dd[f"f{i:05d}"] for i in range(len(files))]
            alone = [i for i, t in enumerate(tables) if _has_null_column(t)]
        except Exception as e:  # noqa: BLE001  (read file by file below, so that the error names its file)
            logger.debug("reading %d %s files together failed (%s); one by one now", len(files), builder, e)
    for i in alone:
        tables[i] = _one_file(builder, files[i], cache)
    parts = []
    for f, ds in zip(files, tables):
        split, task = file_part(f, folder)
        parts.append(Part(ds, str(f), split, task, (f,)))
    return parts


def _folder_parts(
    builder: str, files: Sequence[Path], folder: Path, task_column: str | None, cache: str | None
) -> list[Part] | None:
    """One part per train/test folder for many files with a task column; None when that does not fit."""
    import datasets

    groups: dict[str, list[Path]] = {}
    task_files: dict[str, Path] = {}
    for f in files:
        split, task = file_part(f, folder)
        groups.setdefault(split or "other", []).append(f)
        if task is not None:
            task_files[task] = f
    try:
        dd = datasets.load_dataset(
            builder, data_files={k: [str(f) for f in v] for k, v in groups.items()}, cache_dir=cache
        )
    except Exception as e:  # noqa: BLE001  (the caller reads file by file)
        logger.debug("reading %d %s files by folder failed (%s)", len(files), builder, e)
        return None
    names = (task_column,) if task_column else TASK_COLUMNS
    if not all(any(c in dd[k].column_names for c in names) for k in groups):
        return None
    return [
        Part(
            dd[k],
            f"{len(v)} {builder} files in {folder}" + (f"/{k}" if k != "other" else ""),
            None if k == "other" else k,
            None,
            tuple(v),
            task_files,
        )
        for k, v in groups.items()
    ]


def parts_from_path(path: Path, cache_dir: PathLike | None = None, task_column: str | None = None) -> list[Part]:
    """The tables of a data file, a folder of data files, or a ``save_to_disk`` folder."""
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        import datasets

        with quiet_datasets():
            loaded = datasets.load_from_disk(str(path))
        return parts_from_splits(loaded, str(path), path.name)
    single = path.is_file()
    if single:
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .parquet")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        files = [path]
    else:
        files = data_files(path)
        if not files:
            raise DataError(
                f"{str(path)!r} holds no data: it has no 'tasks/' folder (official SuperNI layout) "
                f"and no .jsonl, .json or .parquet files"
            )
        for f in files:
            if f.stat().st_size == 0:
                logger.warning("skipping empty data file %s", f)
        files = [f for f in files if f.stat().st_size > 0]
    by_builder: dict[str, list[Path]] = {}
    for f in files:
        by_builder.setdefault(BUILDERS[f.suffix.lower()], []).append(f)
    cache = None if cache_dir is None else str(cache_dir)
    parts: list[Part] = []
    with quiet_datasets():
        for builder, group in by_builder.items():
            together = None
            if len(group) > PER_FILE_LIMIT:
                together = _folder_parts(builder, group, path, task_column, cache)
            parts += together if together is not None else _file_parts(builder, group, None if single else path, cache)
    for p in parts:
        if len(p.dataset) == 0:
            if single:
                raise DataError(f"{path}: the file has no rows")
            logger.warning("skipping data file %s: no rows", p.origin)
    parts = [p for p in parts if len(p.dataset)]
    if not parts:
        raise DataError(f"{path}: every data file is empty")
    return parts


def parts_from_hub(repo_id: str, cache_dir: PathLike | None = None) -> list[Part]:
    """The splits of hub dataset ``repo_id`` (``datasets.load_dataset``), each a table."""
    import datasets

    try:
        with quiet_datasets():
            loaded = datasets.load_dataset(repo_id, cache_dir=None if cache_dir is None else str(cache_dir))
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"{repo_id!r} is neither a local file or folder nor a dataset on the Hugging Face Hub ({root_cause(e)})"
        ) from e
    except (ConnectionError, OSError) as e:
        raise DataError(
            f"{repo_id!r} is no local file or folder, and loading it from the Hugging Face Hub failed: "
            f"{root_cause(e)}. Offline? Download it "
            f"where there is a network (`hf download {repo_id} --repo-type dataset --local-dir DIR`) and pass DIR, "
            "or set HF_DATASETS_OFFLINE=1 to use a copy already in the datasets cache"
        ) from e
    return parts_from_splits(loaded, repo_id, repo_id.rsplit("/", 1)[-1])


def parts_from_splits(loaded: Any, origin: str, default_task: str) -> list[Part]:
    """A ``Dataset`` or ``DatasetDict``: its ``test`` split is the unseen pool, the others the seen pool."""
    splits = loaded.items() if hasattr(loaded, "items") else [("train", loaded)]
    parts = [
        Part(ds, f"{origin} [{name}]", "test" if name == "test" else "train", default_task)
        for name, ds in splits
        if len(ds)
    ]
    if not parts:
        raise DataError(f"{origin}: the dataset has no rows")
    return parts
