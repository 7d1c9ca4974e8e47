"""Super-NaturalInstructions (SuperNI) in its official on-disk layout.

The layout is the one of the allenai/natural-instructions repository::

    <data_dir>/tasks/<task_name>.json
    <data_dir>/splits/<split>/train_tasks.txt
    <data_dir>/splits/<split>/test_tasks.txt

so the same code reads the shared subset, a full checkout of the collection, and the embedded
``builtin`` dataset (see :mod:`orchmoe.data.builtin`). :class:`FolderSource` serves such a folder
to the sampling protocol of :mod:`orchmoe.data.multitask`; the other formats (Hugging Face tables,
instruction data, hub ids) are read by :mod:`orchmoe.data.tables`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchmoe.data.builtin import builtin_data_dir
from orchmoe.data.core import (
    DataError,
    PathLike,
    SuperNITask,
    TaskSource,
    as_text,
    names_builtin,
    parse_examples,
)
from orchmoe.utils.fileio import FileFormatError, check_regular_file, path_kind

logger = logging.getLogger(__name__)

#: Keys every task file must have (other official keys such as "Source" are optional here).
REQUIRED_TASK_KEYS = ("Definition", "Positive Examples", "Categories", "Instances")


# --------------------------------------------------------------------------------------------
# Paths


def resolve_data_dir(data_dir: PathLike) -> Path:
    """Turn ``data_dir`` into a checked folder in the official layout; ``"builtin"`` means the
    embedded dataset.

    A real directory named ``builtin`` in the working directory wins over the special value so
    that the special value never shadows user data. Other formats (files, hub ids) are opened by
    :func:`orchmoe.data.open_source`, not here.
    """
    if names_builtin(data_dir):
        return builtin_data_dir()
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"SuperNI data directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is a file, not a SuperNI data directory (tasks/*.json + splits/)")
    if not (path / "tasks").is_dir():
        raise DataError(
            f"{str(path)!r} is not a SuperNI data directory: it has no 'tasks/' folder "
            "(expected tasks/<name>.json and splits/<split>/{train,test}_tasks.txt)"
        )
    return path


def is_superni_dir(path: Path) -> bool:
    """Whether ``path`` is a folder in the official layout (it has a ``tasks/`` folder)."""
    return path.is_dir() and (path / "tasks").is_dir()


def plain_name(name: str, what: str) -> str:
    """``name`` if it is one plain file name (a task or a split): a name with a path separator, ``..``, a
    NUL or nothing in it would read a file outside the data folder, so it is a :class:`DataError`."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"empty {what} name {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or name.startswith(".."):
        raise DataError(
            f"{what} name {name!r} is not a plain name (no '/', '\\', '..' or NUL): it would leave the data folder"
        )
    return name


def task_path(data_dir: PathLike, name: str) -> Path:
    """The file of task ``name`` in a folder in the official layout (``tasks/<name>.json``)."""
    return Path(data_dir) / "tasks" / f"{plain_name(name, 'task')}.json"


def read_name_file(path: Path) -> list[str]:
    """Task names in a text file, one a line (order kept, duplicates, blanks and # comments skipped,
    a trailing ``.json`` dropped)."""
    names: list[str] = []
    seen: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first name
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.removesuffix(".json")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def read_split_file(root: Path, split: str, part: str) -> list[str]:
    """Names in ``root/splits/<split>/<part>_tasks.txt``; :class:`DataError` naming the file if absent."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    path = root / "splits" / plain_name(split, "split") / f"{part}_tasks.txt"
    if path_kind(path) is None:
        known = sorted(p.name for p in (root / "splits").glob("*") if p.is_dir())
        raise DataError(f"split file {path} not found (splits present in {root}: {known})")
    return read_name_file(_regular(path, "split file"))


def _regular(path: Path, what: str) -> Path:
    """``path`` if it is a regular file: a FIFO would block the reader, a folder is not a file (named either way)."""
    try:
        return check_regular_file(path, what)
    except (FileNotFoundError, FileFormatError) as e:
        raise DataError(str(e)) from None


def split_dirs(root: Path) -> list[str]:
    """Names of the folders under ``root/splits`` (sorted)."""
    return sorted(p.name for p in (root / "splits").glob("*") if p.is_dir())


# --------------------------------------------------------------------------------------------
# Task files


def _as_str_list(value: Any, what: str, path: Path) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{path}: {what!r} must be a string or a list of strings, got {type(value).__name__}")


def _parse_instances(value: Any, path: Path) -> list[dict[str, Any]]:
    """Instances with string ids, inputs and reference lists. A null id or input is an error (it would become
    the text "None"); an id given twice with the same input is one instance with the references of both
    (so it cannot land in both train and eval), with a different input an error."""
    if not isinstance(value, list):
        raise DataError(f"{path}: 'Instances' must be a list, got {type(value).__name__}")
    if not value:
        raise DataError(f"{path}: 'Instances' is empty; a task needs at least one instance")
    by_id: dict[str, dict[str, Any]] = {}
    for i, inst in enumerate(value):
        if not isinstance(inst, Mapping):
            raise DataError(f"{path}: Instances[{i}] must be an object, got {type(inst).__name__}")
        missing = [k for k in ("id", "input", "output") if k not in inst]
        if missing:
            raise DataError(f"{path}: Instances[{i}] is missing key(s) {missing}")
        where = f"{path}: Instances[{i}]"
        key, text = as_text(inst["id"], where, "id"), as_text(inst["input"], where, "input")
        refs = _as_str_list(inst["output"], f"Instances[{i}].output", path)
        if not any(r.strip() for r in refs):  # nothing to learn or to score against
            raise DataError(f"{where} (id {key!r}) has no non-empty reference output")
        if key in by_id:  # a repeated instance is one instance (so it cannot land in both train and eval)
            if by_id[key]["input"] != text:
                raise DataError(f"{path}: Instances[{i}] repeats id {key!r} with a different input")
            by_id[key]["output"] += [r for r in refs if r not in by_id[key]["output"]]
            continue
        by_id[key] = {"id": key, "input": text, "output": refs}
    return list(by_id.values())


def read_task_file(path: Path, name: str) -> SuperNITask:
    """Read and validate one official task file.

    Raises :class:`DataError` naming the file for malformed JSON (with the line/column of the
    error), missing required keys, or an empty instance list.
    """
    try:
        with path.open(encoding="utf-8-sig") as f:  # a leading BOM is not JSON but not an error either
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from e
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a task file") from None
    if not isinstance(raw, Mapping):
        raise DataError(f"{path}: top level must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_TASK_KEYS if k not in raw]
    if missing:
        raise DataError(f"{path}: missing required key(s) {missing}")

    definition = " ".join(s.strip() for s in _as_str_list(raw["Definition"], "Definition", path)).strip()
    return SuperNITask(
        name=name,
        definition=definition,
        positive_examples=parse_examples(raw["Positive Examples"], "Positive Examples", path),
        negative_examples=parse_examples(raw.get("Negative Examples", []), "Negative Examples", path),
        categories=_as_str_list(raw["Categories"], "Categories", path),
        instances=_parse_instances(raw["Instances"], path),
        source_path=path,
    )


class FolderSource(TaskSource):
    """A folder in the official layout: one JSON file per task, splits as text files of names."""

    def __init__(self, data_dir: PathLike) -> None:
        self.root = resolve_data_dir(data_dir)
        self.location = self.root
        self.where = f"a task file in {self.root / 'tasks'}"
        self.absent = f"no task file in {self.root / 'tasks'} for"

    def task_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "tasks").glob("*.json"))

    def has_task(self, name: str) -> bool:
        return path_kind(task_path(self.root, name)) is not None  # a FIFO or a folder there is named on load

    def load_task(self, name: str) -> SuperNITask:
        path = task_path(self.root, name)
        if path_kind(path) is None:
            raise DataError(f"task file {path} not found (task {name!r} is not in {self.root})")
        return read_task_file(_regular(path, "task file"), name)

    def split_names(self) -> list[str]:
        return split_dirs(self.root)

    def split_tasks(self, split: str, part: str) -> list[str]:
        return read_split_file(self.root, split, part)
