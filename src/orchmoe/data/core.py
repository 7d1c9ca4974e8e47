"""Types shared by every data source: the error type, a task, an example, the multi-task bundle,
and the :class:`TaskSource` interface that the official folder layout and the tables read with
``datasets`` both implement (so the sampling protocol in :mod:`orchmoe.data.multitask` is written once).

This module imports nothing else from :mod:`orchmoe.data`, so every other module can import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PathLike = str | Path

#: Special value of ``data`` that means "the embedded procedurally generated dataset".
BUILTIN = "builtin"


def names_builtin(data: Any) -> bool:
    """Whether ``data`` means the embedded dataset: the one place this is decided. A real folder named
    ``builtin`` in the working directory wins, so the special value never shadows user data."""
    return isinstance(data, str) and data == BUILTIN and not Path(data).is_dir()


UNKNOWN_CATEGORY = "Unknown"


class DataError(ValueError):
    """A data file is missing, malformed, or cannot satisfy the requested protocol."""


@dataclass
class SuperNITask:
    """One task: its instruction (definition + demonstrations) and its instances.

    ``instances`` are dicts ``{"id": str, "input": str, "output": list[str]}``; ``output`` holds all
    reference answers (scoring takes the best one). ``positive_examples`` are dicts with ``input``,
    ``output`` (str) and ``explanation`` (may be empty). ``source_path`` is the file the task came
    from (the first one when a task spans several files; None for a hub dataset).
    """

    name: str
    definition: str
    positive_examples: list[dict[str, str]]
    categories: list[str]
    instances: list[dict[str, Any]]
    negative_examples: list[dict[str, str]] = field(default_factory=list)
    source_path: Path | None = None

    @property
    def category(self) -> str:
        """The first listed category (SuperNI tasks have exactly one in practice)."""
        return self.categories[0] if self.categories else UNKNOWN_CATEGORY

    def __len__(self) -> int:
        return len(self.instances)


@dataclass(frozen=True)
class Example:
    """One instance ready for prompting/scoring.

    ``task_id`` is the index in :attr:`MultiTaskData.task_to_id` for seen (training) tasks and -1
    for unseen tasks. ``references`` are all gold answers; train on ``target`` (the first one).
    """

    task: str
    task_id: int
    category: str
    id: str
    input: str
    references: tuple[str, ...]

    @property
    def target(self) -> str:
        return self.references[0]

    @property
    def seen(self) -> bool:
        return self.task_id >= 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["references"] = list(self.references)
        return d


@dataclass
class MultiTaskData:
    """Seen tasks with train/eval examples, plus unseen (test-split) tasks with eval examples.

    ``task_defs`` maps every task (seen and unseen) to its :class:`SuperNITask` with its
    ``instances`` list emptied (the sampled instances live in ``train``/``eval``/``unseen``), so
    prompts can be built without keeping whole task files in memory. ``data_dir`` is where the data
    came from: a folder or file (a ``Path``) or a hub dataset id (a ``str``); pass it back to
    :func:`orchmoe.data.load_task` with ``source_options`` to reopen a task.
    """

    data_dir: Path | str
    seen_tasks: list[str]
    unseen_tasks: list[str]
    task_to_id: dict[str, int]
    train: list[Example]
    eval: list[Example]
    unseen: list[Example]
    task_defs: dict[str, SuperNITask]
    source_options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        """Number of seen tasks (the size of a task-id router, e.g. Poly's T)."""
        return len(self.task_to_id)

    @property
    def id_to_task(self) -> list[str]:
        return sorted(self.task_to_id, key=self.task_to_id.__getitem__)

    def categories(self) -> dict[str, str]:
        return {name: t.category for name, t in self.task_defs.items()}


class TaskSource:
    """Where tasks come from: names, splits (lists of names per part) and whole tasks on demand.

    A split is a pair of name lists, its ``train`` part (the pool seen tasks are drawn from) and its
    ``test`` part (the unseen tasks). Lists may name tasks the source does not have; callers keep the
    present ones (:meth:`has_task`). Tasks are read only when asked for (:meth:`load_task`), so a large
    collection costs little until it is sampled.
    """

    #: Recorded as :attr:`MultiTaskData.data_dir`.
    location: Path | str
    #: Completes "N tasks ... have {where}" in messages, e.g. "a task file in /data/tasks".
    where: str
    #: Precedes a list of absent names in messages, e.g. "no task file in /data/tasks for".
    absent: str

    def task_names(self) -> list[str]:
        """All tasks present (sorted)."""
        raise NotImplementedError

    def has_task(self, name: str) -> bool:
        raise NotImplementedError

    def load_task(self, name: str) -> SuperNITask:
        """The whole task with all its instances, validated; :class:`DataError` if absent or malformed."""
        raise NotImplementedError

    def split_names(self) -> list[str]:
        """Names of the splits this source defines (sorted)."""
        raise NotImplementedError

    def split_tasks(self, split: str, part: str) -> list[str]:
        """Task names listed in ``part`` ("train" or "test") of ``split`` (order kept)."""
        raise NotImplementedError

    def missing(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if not self.has_task(n)]


def as_text(value: Any, where: str, what: str) -> str:
    """``value`` as the text of a prompt or an answer: a string, or a number written out. A null, a list or an
    object is a :class:`DataError` naming ``where`` and ``what``: stringified, it would put ``None`` or
    ``['a', 'b']`` into a prompt without a word; so is a NaN or infinite number (``nan`` is how pandas and JSON
    writers spell an empty cell). Shared by the folder and table readers."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):  # how tables and JSON writers spell a missing cell
        raise DataError(f"{where} has {value!r} as its {what!r} (a missing value?); fill it in or remove it")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(f"{where} has a null {what!r}; fill it in or remove it")
    raise DataError(
        f"{where}: {what!r} must be a string, got {type(value).__name__} "
        "(conversational/message lists are not supported)"
    )


def parse_examples(value: Any, key: str, path: Path) -> list[dict[str, str]]:
    """Demonstrations (``Positive Examples``) as ``{input, output, explanation}`` strings; :class:`DataError`
    naming ``path`` and the entry when one is malformed. Shared by the folder and table readers."""
    if not isinstance(value, list):
        raise DataError(f"{path}: {key!r} must be a list, got {type(value).__name__}")
    out = []
    for i, ex in enumerate(value):
        if not isinstance(ex, Mapping) or "input" not in ex or "output" not in ex:
            raise DataError(f"{path}: {key}[{i}] must be an object with 'input' and 'output'")
        output = ex["output"]
        if isinstance(output, list):  # a few community files store a list; keep its first entry
            if not output:
                raise DataError(f"{path}: {key}[{i}] has an empty 'output' list")
            output = output[0]
        where = f"{path}: {key}[{i}]"
        explanation = ex.get("explanation")
        out.append(
            {
                "input": as_text(ex["input"], where, "input"),
                "output": as_text(output, where, "output"),
                "explanation": "" if explanation is None else as_text(explanation, where, "explanation"),
            }
        )
    return out
