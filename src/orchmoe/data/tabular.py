"""Task collections in Hugging Face formats, read with ``datasets`` (no hand-written parsers).

Accepted as ``data`` (besides the official folder layout and ``builtin``, see :mod:`orchmoe.data.superni`):

1. **natural-instructions tables**, the layout of the hub dataset ``Muennighoff/natural-instructions``:
   one row per reference output, rows with the same ``(task_name, id)`` form one instance::

       {"task_name": "task001_quoref_question_generation", "id": "task001-abc", "definition": "Write a question ...",
        "inputs": "Passage: ...", "targets": "What is the name of ...?"}

   An optional demonstrations column (``positive_examples``, ``pos_examples`` or ``Positive Examples``:
   a list of ``{"input", "output", "explanation"}`` or that list as a JSON string) gives the prompt its
   positive examples; without one, prompts have no demonstrations. ``categories``/``category`` are
   read when present.
2. **instruction data**: ``instruction``, ``input``, ``output`` (``output`` may be a list of
   references; ``input`` or ``instruction`` may be absent)::

       {"instruction": "Translate to French.", "input": "cheese", "output": ["fromage"]}

   When every row of a task has the same instruction it is the task definition; otherwise each row's
   instruction is put before its input and the task has no definition.
3. **prompt/completion data**: ``{"prompt": "2 + 2 =", "completion": "4"}`` (no definition).

Each as a ``.jsonl``/``.json``/``.parquet`` file, or a folder of such files (searched recursively;
hidden folders and ``splits/`` skipped), or a folder written by ``Dataset.save_to_disk``, or a hub
dataset id ``owner/name`` (``datasets.load_dataset(id)``; needs the network or the datasets cache).

Task names come from a task column (``task_name``, ``task``, or the ``task_column`` the caller names);
without one, a file is one task named after the file (its stem, less a ``_train``/``_test`` suffix
inside a ``train/``/``test/`` folder) and a hub dataset is one task named after the dataset.

Seen and unseen pools ("default" split): files under a ``train/`` folder (or in the ``train`` split of
a hub dataset or a ``train-00000-of-00001.parquet`` shard) are the seen pool, those under ``test/``
the unseen pool (other files and splits count as train); data without any such split has all
its tasks in the seen pool and none unseen unless the caller names unseen tasks. A folder may also
carry official split files, ``splits/<name>/{train,test}_tasks.txt``, to name other splits.

Empty files are skipped with a warning in a folder and are an error as the whole data. The rules for
duplicate ids, several references and null cells are in :mod:`orchmoe.data.columns`; how files are
read (together or one by one) in :mod:`orchmoe.data.reading`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchmoe.data.columns import RowBlock, Schema, detect_schema, needed_columns, task_from_rows
from orchmoe.data.core import DataError, SuperNITask, TaskSource
from orchmoe.data.reading import Part
from orchmoe.data.superni import plain_name, read_split_file, split_dirs

logger = logging.getLogger(__name__)


def arrow_table(ds: Any) -> Any:
    """The rows of a ``datasets.Dataset`` as a ``pyarrow.Table``, without the per-operation metadata
    copies of ``Dataset.select``/``with_format`` (they cost O(number of splits) each)."""
    if len(ds) != ds.data.num_rows:  # an index mapping (never the case for freshly read data)
        ds = ds.flatten_indices()
    return ds.data.table


# --------------------------------------------------------------------------------------------
# Source


def _group_rows(part: Part, schema: Schema) -> dict[str, np.ndarray]:
    """Row numbers of each task in a table (ascending), from its task column or its default task."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if schema.task is None:
        if part.default_task is None:
            raise DataError(
                f"{part.origin}: no task column ({' or '.join(repr(c) for c in ('task_name', 'task'))}); "
                f"columns found: {part.dataset.column_names}; name it with task_column="
            )
        return {part.default_task: np.arange(len(part.dataset))}
    col = arrow_table(part.dataset).column(schema.task).combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise DataError(f"{part.origin}: row {row + 1} has a null task name in column {schema.task!r}")
    if pa.types.is_nested(col.type):
        raise DataError(
            f"{part.origin}: column {schema.task!r} holds {col.type} values, not task names (a file of columns? "
            "write one JSON object per row)"
        )
    col = pc.cast(col, pa.string())
    blank = np.flatnonzero(np.asarray(pc.equal(pc.utf8_trim_whitespace(col), "")))
    if len(blank):  # a task named '' (or '  ') would train and be scored like any other
        raise DataError(f"{part.origin}: row {int(blank[0]) + 1} has an empty task name in column {schema.task!r}")
    encoded = col.dictionary_encode()
    codes = np.asarray(encoded.indices)
    order = np.argsort(codes, kind="stable")  # rows of each task, ascending
    bounds = np.cumsum(np.bincount(codes, minlength=len(encoded.dictionary)))[:-1]
    return dict(zip(encoded.dictionary.to_pylist(), np.split(order, bounds)))


class TableSource(TaskSource):
    """Tasks in tables read with ``datasets``; each task's rows are materialised only when it is loaded."""

    def __init__(
        self,
        parts: Sequence[Part],
        location: Path | str,
        *,
        task_column: str | None = None,
        split_root: Path | None = None,
    ) -> None:
        self.location = location
        self.where = f"data in {location}"
        self.absent = f"no task in {location} named"
        self.parts = list(parts)
        self.split_root = split_root if split_root is not None and (split_root / "splits").is_dir() else None
        self.schemas = [detect_schema(arrow_table(p.dataset).column_names, p.origin, task_column) for p in self.parts]
        self._rows: dict[str, list[tuple[int, np.ndarray]]] = {}
        self._pools: dict[str, set[str]] = {"train": set(), "test": set()}
        self.has_split_parts = any(p.part is not None for p in self.parts)
        for i, (part, schema) in enumerate(zip(self.parts, self.schemas)):
            for name, rows in _group_rows(part, schema).items():
                self._rows.setdefault(name, []).append((i, rows))
                self._pools[part.part or "train"].add(name)
        both = sorted(self._pools["train"] & self._pools["test"])
        if both:
            logger.warning(
                "%d task(s) have rows in both the train and the test part of %s (e.g. %s); "
                "they are in both pools and their rows are merged",
                len(both),
                location,
                both[0],
            )

    def task_names(self) -> list[str]:
        return sorted(self._rows)

    def has_task(self, name: str) -> bool:
        return name in self._rows

    def load_task(self, name: str) -> SuperNITask:
        if name not in self._rows:
            raise DataError(
                f"no task {name!r} in {self.location} ({len(self._rows)} tasks, e.g. "
                f"{', '.join(self.task_names()[:5])})"
            )
        import pyarrow as pa

        blocks, path = [], None
        for i, rows in self._rows[name]:
            part, schema = self.parts[i], self.schemas[i]
            table = arrow_table(part.dataset).select(needed_columns(schema))
            if rows[-1] - rows[0] + 1 == len(rows):  # one contiguous block (a file per task): no copy
                table = table.slice(int(rows[0]), len(rows))
            else:
                table = table.take(pa.array(rows))
            cols = part.dataset.features.decode_batch(table.to_pydict())  # e.g. Json columns (mixed types)
            origin, numbers, file = part.locate(name, rows.tolist())
            blocks.append(RowBlock(origin, schema, cols, numbers))
            path = path or file
        return task_from_rows(name, blocks, path)

    def split_names(self) -> list[str]:
        extra = split_dirs(self.split_root) if self.split_root is not None else []
        return sorted({"default", *extra})

    def split_tasks(self, split: str, part: str) -> list[str]:
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', got {part!r}")
        if self.split_root is not None and (self.split_root / "splits" / plain_name(split, "split")).is_dir():
            return read_split_file(self.split_root, split, part)
        if split != "default":
            raise DataError(f"{self.location} has no split {split!r} (splits: {self.split_names()})")
        if not self.has_split_parts:  # no split information: every task is a training task
            return self.task_names() if part == "train" else []
        return sorted(self._pools[part])
