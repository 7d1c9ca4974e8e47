"""Loader for Super-NaturalInstructions (SuperNI) in its official on-disk layout.

The layout is the one of the allenai/natural-instructions repository::

    <data_dir>/tasks/<task_name>.json
    <data_dir>/splits/<split>/train_tasks.txt
    <data_dir>/splits/<split>/test_tasks.txt

so the same code reads the shared subset, a full checkout of the collection, and the embedded
``builtin`` dataset (see :mod:`orchmoe.data.builtin`). Everything that draws at random takes an
explicit seed and uses its own :class:`random.Random`, so results never depend on global state,
on the order tasks were loaded in, or on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Keys every task file must have (other official keys such as "Source" are optional here).
REQUIRED_TASK_KEYS = ("Definition", "Positive Examples", "Categories", "Instances")
#: Special value of ``data_dir`` that means "the embedded procedurally generated dataset".
BUILTIN = "builtin"
UNKNOWN_CATEGORY = "Unknown"


class DataError(ValueError):
    """A data file is missing, malformed, or cannot satisfy the requested protocol."""


@dataclass
class SuperNITask:
    """One SuperNI task: its instruction (definition + demonstrations) and its instances.

    ``instances`` are dicts ``{"id": str, "input": str, "output": list[str]}``; ``output`` holds all
    reference answers (scoring takes the best one). ``positive_examples`` are dicts with ``input``,
    ``output`` (str) and ``explanation`` (may be empty).
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


# --------------------------------------------------------------------------------------------
# Paths


def resolve_data_dir(data_dir: PathLike) -> Path:
    """Turn ``data_dir`` into a checked directory; ``"builtin"`` means the embedded dataset.

    A real directory named ``builtin`` in the working directory wins over the special value so
    that the special value never shadows user data.
    """
    if isinstance(data_dir, str) and data_dir == BUILTIN and not Path(data_dir).is_dir():
        from orchmoe.data.builtin import builtin_data_dir  # local import: builtin imports us

        return builtin_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"SuperNI data directory {str(path)!r} does not exist")
    if not (path / "tasks").is_dir():
        raise DataError(
            f"{str(path)!r} is not a SuperNI data directory: it has no 'tasks/' folder "
            "(expected tasks/<name>.json and splits/<split>/{train,test}_tasks.txt)"
        )
    return path


def task_path(data_dir: PathLike, name: str) -> Path:
    return Path(data_dir) / "tasks" / f"{name}.json"


def available_tasks(data_dir: PathLike) -> list[str]:
    """Names of all task files present in ``data_dir/tasks`` (sorted)."""
    root = resolve_data_dir(data_dir)
    return sorted(p.stem for p in (root / "tasks").glob("*.json"))


# --------------------------------------------------------------------------------------------
# Task files


def _as_str_list(value: Any, what: str, path: Path) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{path}: {what!r} must be a string or a list of strings, got {type(value).__name__}")


def _parse_examples(value: Any, key: str, path: Path) -> list[dict[str, str]]:
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
        out.append(
            {"input": str(ex["input"]), "output": str(output), "explanation": str(ex.get("explanation", ""))}
        )
    return out


def _parse_instances(value: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise DataError(f"{path}: 'Instances' must be a list, got {type(value).__name__}")
    if not value:
        raise DataError(f"{path}: 'Instances' is empty; a task needs at least one instance")
    out = []
    for i, inst in enumerate(value):
        if not isinstance(inst, Mapping):
            raise DataError(f"{path}: Instances[{i}] must be an object, got {type(inst).__name__}")
        missing = [k for k in ("id", "input", "output") if k not in inst]
        if missing:
            raise DataError(f"{path}: Instances[{i}] is missing key(s) {missing}")
        refs = _as_str_list(inst["output"], f"Instances[{i}].output", path)
        if not refs:
            raise DataError(f"{path}: Instances[{i}] (id {inst['id']!r}) has no reference output")
        out.append({"id": str(inst["id"]), "input": str(inst["input"]), "output": refs})
    return out


def load_task(data_dir: PathLike, name: str) -> SuperNITask:
    """Read and validate ``<data_dir>/tasks/<name>.json``.

    Raises :class:`DataError` naming the file for a missing file, malformed JSON (with the
    line/column of the error), missing required keys, or an empty instance list.
    """
    root = resolve_data_dir(data_dir)
    path = task_path(root, name)
    if not path.is_file():
        raise DataError(f"task file {path} not found (task {name!r} is not in {root})")
    try:
        with path.open(encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from e
    if not isinstance(raw, Mapping):
        raise DataError(f"{path}: top level must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_TASK_KEYS if k not in raw]
    if missing:
        raise DataError(f"{path}: missing required key(s) {missing}")

    definition = " ".join(s.strip() for s in _as_str_list(raw["Definition"], "Definition", path)).strip()
    return SuperNITask(
        name=name,
        definition=definition,
        positive_examples=_parse_examples(raw["Positive Examples"], "Positive Examples", path),
        negative_examples=_parse_examples(raw.get("Negative Examples", []), "Negative Examples", path),
        categories=_as_str_list(raw["Categories"], "Categories", path),
        instances=_parse_instances(raw["Instances"], path),
        source_path=path,
    )


# --------------------------------------------------------------------------------------------
# Splits and task selection


def read_split(data_dir: PathLike, split: str = "default", part: str = "train") -> list[str]:
    """Task names listed in ``splits/<split>/<part>_tasks.txt`` (order kept, blanks/# skipped)."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    root = resolve_data_dir(data_dir)
    path = root / "splits" / split / f"{part}_tasks.txt"
    if not path.is_file():
        known = sorted(p.name for p in (root / "splits").glob("*") if p.is_dir())
        raise DataError(f"split file {path} not found (splits present in {root}: {known})")
    return _read_name_file(path)


def _read_name_file(path: Path) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line[:-5] if line.endswith(".json") else line
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _present(root: Path, names: Iterable[str]) -> list[str]:
    return [n for n in names if task_path(root, n).is_file()]


def _check_present(root: Path, names: Sequence[str], origin: str) -> list[str]:
    missing = [n for n in names if not task_path(root, n).is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise DataError(f"{origin}: no task file in {root / 'tasks'} for: {shown}")
    return list(names)


def select_tasks(
    data_dir: PathLike,
    tasks: int | Sequence[str] | str,
    split: str = "default",
    seed: int = 0,
    *,
    min_instances: int = 0,
    _loaded: dict[str, SuperNITask] | None = None,
) -> list[str]:
    """Resolve a task specification to a list of task names present in ``data_dir``.

    ``tasks`` may be
      * an int ``N``: the train part of ``split``, restricted to tasks whose file exists (and,
        if ``min_instances > 0``, that have at least that many instances), shuffled with
        ``random.Random(seed)``; the first N are returned, sorted. The "NI-100" protocol draws
        100 tasks with ``min_instances=1100`` (1000 train + 100 eval);
      * a list of names (validated, order kept, duplicates removed);
      * a string: digits (same as the int), a path to a text file of names (one a line), the
        name of a split in ``data_dir/splits`` (its train part, restricted to present tasks,
        with a warning if some are absent), or a comma-separated list of names.
    Only the int form filters by ``min_instances``; explicit names are taken as given.
    """
    root = resolve_data_dir(data_dir)
    if isinstance(tasks, bool):
        raise TypeError("tasks must be an int, a list of names or a string, not a bool")
    if isinstance(tasks, str) and tasks.strip().isdigit():  # "100" straight from a command line
        tasks = int(tasks.strip())
    if isinstance(tasks, int):
        if tasks <= 0:
            raise DataError(f"number of tasks must be positive, got {tasks}")
        pool = _present(root, read_split(root, split, "train"))
        random.Random(seed).shuffle(pool)
        chosen: list[str] = []
        for name in pool:  # task files are only opened when a size threshold asks for it
            if len(chosen) == tasks:
                break
            if min_instances > 0:
                task = load_task(root, name)
                if len(task.instances) < min_instances:
                    continue
                if _loaded is not None:  # lets load_multitask avoid parsing the file twice
                    _loaded[name] = task
            chosen.append(name)
        if len(chosen) < tasks:
            cond = f" and at least {min_instances} instances" if min_instances > 0 else ""
            raise DataError(
                f"asked for {tasks} tasks but only {len(chosen)} tasks of split {split!r} (train) "
                f"have a task file in {root / 'tasks'}{cond}"
            )
        return sorted(chosen)
    if isinstance(tasks, str):
        spec = tasks.strip()
        if not spec:
            raise DataError("empty task specification")
        as_path = Path(spec).expanduser()
        try:
            is_file = as_path.is_file()
        except OSError:  # a long comma-separated list is no file name (ENAMETOOLONG)
            is_file = False
        if is_file:
            names = _read_name_file(as_path)
            if not names:
                raise DataError(f"task list file {as_path} names no task")
            return _check_present(root, names, f"task list {as_path}")
        if "," not in spec and (root / "splits" / spec).is_dir():
            listed = read_split(root, spec, "train")
            names = _present(root, listed)
            if not names:
                raise DataError(f"none of the {len(listed)} train tasks of split {spec!r} is in {root / 'tasks'}")
            if len(names) < len(listed):
                logger.warning(
                    "split %r lists %d train tasks; only %d have a task file in %s, using those",
                    spec, len(listed), len(names), root / "tasks",
                )
            return names
        names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
        if not names:
            raise DataError(f"task specification {tasks!r} names no task")
        return _check_present(root, names, f"task specification {tasks!r}")
    names = list(dict.fromkeys(str(n) for n in tasks))
    if not names:
        raise DataError("empty task list")
    return _check_present(root, names, "task list")


# --------------------------------------------------------------------------------------------
# Instance sampling


def sample_instances(
    task: SuperNITask,
    n_train: int | None,
    n_eval: int,
    seed: int = 0,
    *,
    allow_fewer_train: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a task's instances into disjoint (train, eval) lists, reproducibly.

    The permutation is seeded by ``(seed, task name)``, so a task gets the same split whatever
    other tasks are loaded. Eval instances are taken first, so the eval set does not change when
    ``n_train`` does. ``n_train=None`` means all remaining instances. This is the paper protocol
    "1000 train + 100 eval per task" (NI-100) with ``n_train=1000, n_eval=100``.

    A task with fewer than ``n_train + n_eval`` instances is an error, unless
    ``allow_fewer_train``: then it keeps its ``n_eval`` eval instances and trains on the rest
    (still an error if nothing would be left for training).
    """
    if n_eval < 0 or (n_train is not None and n_train < 0):
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    have = len(task.instances)
    if n_train is None or allow_fewer_train:
        if have <= n_eval:
            raise DataError(
                f"task {task.name!r} has only {have} instances; {n_eval} eval + at least 1 train were requested"
            )
    elif have < n_train + n_eval:
        raise DataError(
            f"task {task.name!r} has only {have} instances; {n_train} train + {n_eval} eval were requested"
        )
    order = list(range(have))
    random.Random(f"{seed}:{task.name}").shuffle(order)
    eval_idx = order[:n_eval]
    train_idx = order[n_eval:] if n_train is None else order[n_eval : n_eval + n_train]
    return [task.instances[i] for i in train_idx], [task.instances[i] for i in eval_idx]


def unseen_eval_instances(task: SuperNITask, n: int = 100) -> list[dict[str, Any]]:
    """The first ``n`` instances (fewer if the task has fewer): the official evaluation set for
    tasks of the test split, as in the SuperNI/Tk-Instruct evaluation."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return list(task.instances[:n])


# --------------------------------------------------------------------------------------------
# Multi-task data


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


def _examples(task: SuperNITask, task_id: int, instances: Iterable[Mapping[str, Any]]) -> list[Example]:
    return [
        Example(
            task=task.name,
            task_id=task_id,
            category=task.category,
            id=inst["id"],
            input=inst["input"],
            references=tuple(inst["output"]),
        )
        for inst in instances
    ]


@dataclass
class MultiTaskData:
    """Seen tasks with train/eval examples, plus unseen (test-split) tasks with eval examples.

    ``task_defs`` maps every task (seen and unseen) to its :class:`SuperNITask` with its
    ``instances`` list emptied (the sampled instances live in ``train``/``eval``/``unseen``), so
    prompts can be built without keeping whole task files in memory.
    """

    data_dir: Path
    seen_tasks: list[str]
    unseen_tasks: list[str]
    task_to_id: dict[str, int]
    train: list[Example]
    eval: list[Example]
    unseen: list[Example]
    task_defs: dict[str, SuperNITask]

    @property
    def num_tasks(self) -> int:
        """Number of seen tasks (the size of a task-id router, e.g. Poly's T)."""
        return len(self.task_to_id)

    @property
    def id_to_task(self) -> list[str]:
        return sorted(self.task_to_id, key=self.task_to_id.__getitem__)

    def categories(self) -> dict[str, str]:
        return {name: t.category for name, t in self.task_defs.items()}


def load_multitask(
    data_dir: PathLike,
    tasks: int | Sequence[str] | str,
    split: str = "default",
    n_train: int | None = 1000,
    n_eval: int = 100,
    n_unseen_tasks: int | Sequence[str] | None = None,
    seed: int = 0,
    n_unseen_eval: int = 100,
    allow_fewer_train: bool = False,
    task_seed: int | None = None,
) -> MultiTaskData:
    """Load the multi-task protocol in one call.

    Seen tasks come from :func:`select_tasks` and get ``task_to_id`` ids in sorted-name order
    (stable whatever order they were given in). Each seen task contributes ``n_train`` train and
    ``n_eval`` eval instances (:func:`sample_instances`). Unseen tasks are the tasks of the test
    part of ``split`` that exist in ``data_dir`` (``n_unseen_tasks``: None = all of them, an int =
    that many drawn with ``seed``, 0 = none, a list of names, or a string: the name of another
    split (its test part), a file of names, or comma-separated names); each contributes its
    first ``n_unseen_eval`` instances (:func:`unseen_eval_instances`).

    When ``tasks`` is an int, only tasks with enough instances for the protocol are drawn
    (``n_train + n_eval``, or ``n_eval + 1`` with ``n_train=None`` or ``allow_fewer_train``);
    explicitly named tasks with too few instances are an error unless ``allow_fewer_train``.
    ``task_seed`` (default ``seed``) draws the tasks and the unseen tasks, so several seeds can share them.
    """
    root = resolve_data_dir(data_dir)
    if n_train is None or allow_fewer_train:
        min_instances = n_eval + 1
    else:
        min_instances = n_train + n_eval
    loaded: dict[str, SuperNITask] = {}
    task_seed = seed if task_seed is None else task_seed  # the task draw; instances always follow `seed`
    seen = sorted(select_tasks(root, tasks, split=split, seed=task_seed, min_instances=min_instances, _loaded=loaded))
    task_to_id = {name: i for i, name in enumerate(seen)}

    if n_unseen_tasks is None or (isinstance(n_unseen_tasks, int) and not isinstance(n_unseen_tasks, bool)):
        if n_unseen_tasks == 0:
            unseen: list[str] = []
        else:
            pool = [n for n in _present(root, read_split(root, split, "test")) if n not in task_to_id]
            if n_unseen_tasks is None:
                unseen = sorted(pool)
            else:
                if n_unseen_tasks < 0 or n_unseen_tasks > len(pool):
                    raise DataError(
                        f"asked for {n_unseen_tasks} unseen tasks but split {split!r} (test) has "
                        f"{len(pool)} with a task file in {root / 'tasks'}"
                    )
                random.Random(task_seed).shuffle(pool)
                unseen = sorted(pool[:n_unseen_tasks])
    elif isinstance(n_unseen_tasks, str) and "," not in n_unseen_tasks and (root / "splits" / n_unseen_tasks).is_dir():
        unseen = sorted(n for n in _present(root, read_split(root, n_unseen_tasks, "test")) if n not in task_to_id)
    else:  # explicit names: a list, a comma-separated string or a file of names
        spec = n_unseen_tasks if isinstance(n_unseen_tasks, str) else list(n_unseen_tasks)
        unseen = sorted(select_tasks(root, spec, split=split, seed=task_seed))
        overlap = sorted(set(unseen) & set(task_to_id))
        if overlap:
            raise DataError(f"tasks {overlap} are both seen (training) and unseen")

    train: list[Example] = []
    evals: list[Example] = []
    unseen_ex: list[Example] = []
    defs: dict[str, SuperNITask] = {}
    for name in seen:
        task = loaded.pop(name, None) or load_task(root, name)
        tr, ev = sample_instances(task, n_train, n_eval, seed, allow_fewer_train=allow_fewer_train)
        train += _examples(task, task_to_id[name], tr)
        evals += _examples(task, task_to_id[name], ev)
        defs[name] = dataclasses.replace(task, instances=[])
    for name in unseen:
        task = load_task(root, name)
        unseen_ex += _examples(task, -1, unseen_eval_instances(task, n_unseen_eval))
        defs[name] = dataclasses.replace(task, instances=[])
    return MultiTaskData(
        data_dir=root,
        seen_tasks=seen,
        unseen_tasks=unseen,
        task_to_id=task_to_id,
        train=train,
        eval=evals,
        unseen=unseen_ex,
        task_defs=defs,
    )
