"""The multi-task protocol on any data: choose tasks, split instances, build examples.

``data`` (the ``--data`` of the command line) may be any of these; every format gives tasks with a
definition, optional demonstrations and instances with one or more references:

* ``"builtin"``: the embedded procedurally generated suite (:mod:`orchmoe.data.builtin`);
* the official SuperNI folder layout (:mod:`orchmoe.data.superni`): ``tasks/<name>.json`` with
  ``{"Definition": ["..."], "Positive Examples": [...], "Categories": [...], "Instances":
  [{"id": "task001-1", "input": "...", "output": ["..."]}]}`` and ``splits/<split>/{train,test}_tasks.txt``;
* natural-instructions tables (hub ``Muennighoff/natural-instructions``), one row per reference:
  ``{"task_name": "task001_x", "id": "task001-1", "definition": "...", "inputs": "...", "targets": "..."}``;
  a folder with ``train/`` and ``test/`` folders of ``{task}_{split}.jsonl`` files gives the seen and
  unseen pools;
* instruction data: ``{"instruction": "...", "input": "...", "output": "..." or ["...", "..."]}``;
* prompt/completion data: ``{"prompt": "...", "completion": "..."}``;
* each table format as ``.jsonl``/``.json``/``.parquet`` files (one task per file, named after the
  file, or a ``task_name``/``task``/caller-named task column), a folder of them, a
  ``Dataset.save_to_disk`` folder, or a hub dataset id ``owner/name`` (needs the network or the cache).

:mod:`orchmoe.data.tables` gives the details (demonstration columns, split rules, null and duplicate
rules). Data without splits has all its tasks seen; unseen tasks are then named by the caller.

Everything that draws at random takes an explicit seed and uses its own :class:`random.Random`, so
results never depend on global state, on the order tasks were loaded in, or on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchmoe.data.core import DataError, Example, MultiTaskData, PathLike, SuperNITask, TaskSource
from orchmoe.data.sources import open_source
from orchmoe.data.superni import read_name_file

logger = logging.getLogger(__name__)

#: ``tasks="all"``: every task of the train part of the split.
ALL_TASKS = "all"


def available_tasks(data: Any, **source_options: Any) -> list[str]:
    """Names of all tasks present in ``data`` (sorted)."""
    return open_source(data, **source_options).task_names()


def load_task(data: Any, name: str, **source_options: Any) -> SuperNITask:
    """One whole task (all instances) from ``data``; :class:`DataError` naming the file when it is
    missing or malformed. ``source_options`` (``task_column``, ``cache_dir``) go to :func:`open_source`."""
    return open_source(data, **source_options).load_task(name)


def read_split(data: Any, split: str = "default", part: str = "train", **source_options: Any) -> list[str]:
    """Task names listed in ``part`` ("train"/"test") of ``split`` (order kept; may name absent tasks).

    For the official layout this is ``splits/<split>/<part>_tasks.txt``; for tables, the
    ``train/``/``test/`` folders (split "default") or official split files next to them.
    """
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    return open_source(data, **source_options).split_tasks(split, part)


def _present(source: TaskSource, names: Iterable[str]) -> list[str]:
    return [n for n in names if source.has_task(n)]


def _check_present(source: TaskSource, names: Sequence[str], origin: str) -> list[str]:
    missing = source.missing(names)
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise DataError(f"{origin}: {source.absent}: {shown}")
    return list(names)


def _split_pool(source: TaskSource, split: str, part: str) -> list[str]:
    listed = source.split_tasks(split, part)
    names = _present(source, listed)
    if not names:
        raise DataError(f"none of the {len(listed)} {part} tasks of split {split!r} is in {source.location}")
    if len(names) < len(listed):
        logger.warning(
            "split %r lists %d %s tasks; only %d have %s, using those",
            split,
            len(listed),
            part,
            len(names),
            source.where,
        )
    return names


def _draw(
    source: TaskSource,
    n: int,
    split: str,
    seed: int,
    min_instances: int,
    loaded: dict[str, SuperNITask] | None,
    exclude: frozenset[str],
) -> list[str]:
    if n <= 0:
        raise DataError(f"number of tasks must be positive, got {n}")
    pool = _present(source, source.split_tasks(split, "train"))
    random.Random(seed).shuffle(pool)
    chosen: list[str] = []
    for name in pool:  # tasks are only read when a size threshold asks for it
        if len(chosen) == n:
            break
        if name in exclude:
            continue
        if min_instances > 0:
            task = source.load_task(name)
            if len(task.instances) < min_instances:
                continue
            if loaded is not None:  # lets load_multitask avoid reading the task twice
                loaded[name] = task
        chosen.append(name)
    if len(chosen) < n:
        cond = f" and at least {min_instances} instances" if min_instances > 0 else ""
        raise DataError(
            f"asked for {n} tasks but only {len(chosen)} tasks of split {split!r} (train) "
            f"have {source.where}{cond}" + (f", not counting {len(exclude)} unseen task(s)" if exclude else "")
        )
    return sorted(chosen)


def select_tasks(
    data: Any,
    tasks: int | Sequence[str] | str,
    split: str = "default",
    seed: int = 0,
    *,
    min_instances: int = 0,
    exclude: Iterable[str] = (),
    _loaded: dict[str, SuperNITask] | None = None,
    **source_options: Any,
) -> list[str]:
    """Resolve a task specification to a list of task names present in ``data``.

    ``tasks`` may be
      * an int ``N``: the train part of ``split``, restricted to present tasks (and, if
        ``min_instances > 0``, to tasks with at least that many instances) and not in ``exclude``,
        shuffled with ``random.Random(seed)``; the first N are returned, sorted. The "NI-100"
        protocol draws 100 tasks with ``min_instances=1100`` (1000 train + 100 eval);
      * a list of names (validated, order kept, duplicates removed);
      * a string: digits (same as the int), ``"all"`` (the whole train part of ``split``), a path to
        a text file of names (one a line), the name of a split of ``data`` (its train part,
        restricted to present tasks, with a warning if some are absent), or comma-separated names.
    Only the int form filters by ``min_instances`` and ``exclude``; explicit names are taken as given.
    """
    source = open_source(data, **source_options)
    if isinstance(tasks, bool):
        raise TypeError("tasks must be an int, a list of names or a string, not a bool")
    if isinstance(tasks, str) and tasks.strip().isdigit():  # "100" straight from a command line
        tasks = int(tasks.strip())
    if isinstance(tasks, int):
        return _draw(source, tasks, split, seed, min_instances, _loaded, frozenset(exclude))
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
            names = read_name_file(as_path)
            if not names:
                raise DataError(f"task list file {as_path} names no task")
            return _check_present(source, names, f"task list {as_path}")
        if "," not in spec and spec in source.split_names():
            return _split_pool(source, spec, "train")
        if spec == ALL_TASKS:
            return _split_pool(source, split, "train")
        names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
        if not names:
            raise DataError(f"task specification {tasks!r} names no task")
        return _check_present(source, names, f"task specification {tasks!r}")
    names = list(dict.fromkeys(str(n) for n in tasks))
    if not names:
        raise DataError("empty task list")
    return _check_present(source, names, "task list")


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
        raise DataError(f"task {task.name!r} has only {have} instances; {n_train} train + {n_eval} eval were requested")
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


def _explicit_unseen(source: TaskSource, spec: Any, split: str, task_seed: int) -> list[str] | None:
    """Names when ``n_unseen_tasks`` names tasks (a list, a file of names, comma-separated names), else None."""
    if spec is None or isinstance(spec, (bool, int)):
        return None
    if isinstance(spec, str) and (spec.strip().isdigit() or ("," not in spec and spec in source.split_names())):
        return None
    return sorted(select_tasks(source, spec if isinstance(spec, str) else list(spec), split=split, seed=task_seed))


def _unseen_pool(source: TaskSource, spec: Any, split: str, seen: set[str], task_seed: int) -> list[str]:
    """Unseen tasks for ``n_unseen_tasks`` given as None (all), an int (a draw) or a split name."""
    if isinstance(spec, str) and not spec.strip().isdigit():  # another split's test part
        return sorted(n for n in _present(source, source.split_tasks(spec, "test")) if n not in seen)
    count = None if spec is None else int(spec)
    if count == 0:
        return []
    listed = source.split_tasks(split, "test")
    pool = [n for n in _present(source, listed) if n not in seen]
    absent = [n for n in listed if not source.has_task(n)]
    if absent:
        logger.warning(
            "split %r lists %d test task(s) without %s (%s); they are not scored",
            split,
            len(absent),
            source.where,
            ", ".join(absent[:5]),
        )
    if count is None:
        return sorted(pool)
    if count < 0 or count > len(pool):
        hint = "" if pool else "; this data has no test tasks: name the unseen tasks instead"
        raise DataError(
            f"asked for {count} unseen tasks but split {split!r} (test) has {len(pool)} with {source.where}{hint}"
        )
    random.Random(task_seed).shuffle(pool)
    return sorted(pool[:count])


def _build_examples(
    source: TaskSource,
    seen: list[str],
    unseen: list[str],
    task_to_id: dict[str, int],
    loaded: dict[str, SuperNITask],
    n_train: int | None,
    n_eval: int,
    seed: int,
    allow_fewer_train: bool,
    n_unseen_eval: int,
) -> tuple[list[Example], list[Example], list[Example], dict[str, SuperNITask]]:
    """(train, eval, unseen examples, every task's definition without its instances)."""
    train: list[Example] = []
    evals: list[Example] = []
    unseen_ex: list[Example] = []
    defs: dict[str, SuperNITask] = {}
    for name in seen:
        task = loaded.pop(name, None) or source.load_task(name)
        tr, ev = sample_instances(task, n_train, n_eval, seed, allow_fewer_train=allow_fewer_train)
        train += _examples(task, task_to_id[name], tr)
        evals += _examples(task, task_to_id[name], ev)
        defs[name] = dataclasses.replace(task, instances=[])
    for name in unseen:
        task = source.load_task(name)
        unseen_ex += _examples(task, -1, unseen_eval_instances(task, n_unseen_eval))
        defs[name] = dataclasses.replace(task, instances=[])
    return train, evals, unseen_ex, defs


def _seen_tasks(
    source: TaskSource,
    tasks: int | Sequence[str] | str,
    split: str,
    task_seed: int,
    min_instances: int,
    named_unseen: list[str] | None,
    loaded: dict[str, SuperNITask],
) -> list[str]:
    """The seen tasks, sorted (their ids follow this order); an empty list means only unseen tasks, to score
    a trained adapter on new data."""
    if isinstance(tasks, (list, tuple)) and not tasks:
        return []
    chosen = select_tasks(
        source,
        tasks,
        split=split,
        seed=task_seed,
        min_instances=min_instances,
        exclude=named_unseen or (),
        _loaded=loaded,
    )
    return sorted(chosen)


def load_multitask(
    data: Any,
    tasks: int | Sequence[str] | str,
    split: str = "default",
    n_train: int | None = 1000,
    n_eval: int = 100,
    n_unseen_tasks: int | Sequence[str] | str | None = None,
    seed: int = 0,
    n_unseen_eval: int = 100,
    allow_fewer_train: bool = False,
    task_seed: int | None = None,
    *,
    task_column: str | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """Load the multi-task protocol in one call, from data in any accepted format.

    Args:
        data: the data: a SuperNI folder, ``"builtin"``, a data file or folder, or a hub id
            (see :mod:`orchmoe.data.tables` for every format, with example rows).
        tasks: which seen tasks (:func:`select_tasks`); they get ``task_to_id`` ids in sorted-name order. An empty
            list: none (only unseen tasks, to score a trained adapter on new data).
        split: the split whose train part is the seen pool and test part the unseen pool.
        n_train, n_eval: instances per seen task, disjoint, drawn with ``seed``
            (:func:`sample_instances`; ``n_train=None``: all that are not eval).
        n_unseen_tasks: None = every test-part task, an int = that many drawn with ``task_seed``,
            0 = none, a list of names, or a string: another split's name (its test part), a file of
            names, or comma-separated names. Named unseen tasks are never drawn as seen tasks. Data
            without splits has no test part: all tasks are seen unless unseen tasks are named.
        seed: the instance split. n_unseen_eval: the first that many instances of each unseen task.
        allow_fewer_train: keep tasks with fewer than ``n_train + n_eval`` instances (they train on the rest).
        task_seed: the task draws (default ``seed``), so several seeds can share their tasks.
        task_column, cache_dir: for tables (:func:`orchmoe.data.open_source`).

    Returns:
        :class:`MultiTaskData`. When ``tasks`` is an int, only tasks with enough instances for the
        protocol are drawn (``n_train + n_eval``, or ``n_eval + 1`` with ``n_train=None`` or
        ``allow_fewer_train``); named tasks with too few instances are an error unless ``allow_fewer_train``.
    """
    options = {"task_column": task_column} if task_column is not None else {}
    source = open_source(data, cache_dir=cache_dir, **options)
    min_instances = n_eval + 1 if n_train is None or allow_fewer_train else n_train + n_eval
    loaded: dict[str, SuperNITask] = {}
    task_seed = seed if task_seed is None else task_seed  # the task draw; instances always follow `seed`
    named_unseen = _explicit_unseen(source, n_unseen_tasks, split, task_seed)
    seen = _seen_tasks(source, tasks, split, task_seed, min_instances, named_unseen, loaded)
    task_to_id = {name: i for i, name in enumerate(seen)}
    if named_unseen is not None:
        unseen = named_unseen
        overlap = sorted(set(unseen) & set(task_to_id))
        if overlap:
            raise DataError(f"tasks {overlap} are both seen (training) and unseen")
    else:
        unseen = _unseen_pool(source, n_unseen_tasks, split, set(task_to_id), task_seed)

    train, evals, unseen_ex, defs = _build_examples(
        source, seen, unseen, task_to_id, loaded, n_train, n_eval, seed, allow_fewer_train, n_unseen_eval
    )
    return MultiTaskData(
        data_dir=source.location,
        seen_tasks=seen,
        unseen_tasks=unseen,
        task_to_id=task_to_id,
        train=train,
        eval=evals,
        unseen=unseen_ex,
        task_defs=defs,
        source_options=options,
    )
