"""Which columns of a table hold what, and rows -> one task's instances (with the validation rules).

The column sets recognised (see :mod:`orchmoe.data.tables` for example rows):

* natural-instructions (Hugging Face ``Muennighoff/natural-instructions``): ``inputs``, ``targets``,
  optional ``task_name``, ``id``, ``definition`` and a demonstrations column;
* instruction data: ``output`` with ``instruction`` and/or ``input``;
* prompt/completion: ``prompt``, ``completion``.

Rules, applied when a task is read (so a bad row in a task that is never sampled costs nothing):
rows sharing a task and an ``id`` are one instance whose references are the rows' outputs in order,
repeats dropped (this is how the natural-instructions layout stores several references); the same
id with two different inputs is a :class:`DataError`. Without an ``id`` column every row is its own
instance (id ``<task>-<k>``). A null input or output is a :class:`DataError` naming the file and
the row (rows count from 1), except a null ``input`` next to an ``instruction``, which means "no input".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchmoe.data.core import DataError, SuperNITask, as_text, parse_examples

TASK_COLUMNS = ("task_name", "task")
POSITIVE_COLUMNS = ("positive_examples", "pos_examples", "Positive Examples")
CATEGORY_COLUMNS = ("categories", "category")
NI_LAYOUT = "natural-instructions layout (task_name, id, definition, inputs, targets)"
INSTRUCTION_LAYOUT = "instruction layout (instruction, input, output)"
PROMPT_LAYOUT = "prompt/completion layout (prompt, completion)"


@dataclass(frozen=True)
class Schema:
    """The roles of a table's columns (None: the table has no such column)."""

    layout: str
    input: str | None
    output: str
    instruction: str | None = None
    task: str | None = None
    id: str | None = None
    definition: str | None = None
    positive: str | None = None
    category: str | None = None


def _first(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((c for c in names if c in columns), None)


def detect_schema(columns: Sequence[str], origin: str, task_column: str | None = None) -> Schema:
    """The :class:`Schema` of a table with ``columns``; :class:`DataError` naming ``origin``, the
    missing column and the columns found when no layout fits."""
    cols = list(columns)
    found = f"columns found: {cols}"

    def need(names: Sequence[str], layout: str) -> None:
        missing = [c for c in names if c not in cols]
        if missing:
            raise DataError(f"{origin}: missing column {missing[0]!r} for the {layout}; {found}")

    if "inputs" in cols or "targets" in cols:
        need(["inputs", "targets"], NI_LAYOUT)
        layout, inp, out, instr = NI_LAYOUT, "inputs", "targets", None
    elif "prompt" in cols or "completion" in cols:
        need(["prompt", "completion"], PROMPT_LAYOUT)
        layout, inp, out, instr = PROMPT_LAYOUT, "prompt", "completion", None
    elif "output" in cols or "instruction" in cols or "input" in cols:
        need(["output"], INSTRUCTION_LAYOUT)
        if "instruction" not in cols and "input" not in cols:
            need(["input"], INSTRUCTION_LAYOUT)
        layout, out = INSTRUCTION_LAYOUT, "output"
        inp = "input" if "input" in cols else None
        instr = "instruction" if "instruction" in cols else None
    else:
        hint = ""
        if "Instances" in cols and "Definition" in cols:
            hint = " (this is an official SuperNI task file: pass the folder that holds tasks/ and splits/)"
        raise DataError(
            f"{origin}: no known column set: expected inputs+targets ({NI_LAYOUT}), "
            f"instruction/input+output ({INSTRUCTION_LAYOUT}) or prompt+completion; {found}{hint}"
        )
    if task_column is not None and task_column not in cols:
        raise DataError(f"{origin}: missing task column {task_column!r} (given as task_column); {found}")
    return Schema(
        layout=layout,
        input=inp,
        output=out,
        instruction=instr,
        task=task_column or _first(cols, TASK_COLUMNS),
        id="id" if "id" in cols else None,
        definition=_first(cols, ("definition", "Definition")),
        positive=_first(cols, POSITIVE_COLUMNS),
        category=_first(cols, CATEGORY_COLUMNS),
    )


# --------------------------------------------------------------------------------------------
# Cell values


def _references(value: Any, where: str, column: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where} has an empty {column!r} list (no reference output)")
        refs = [as_text(v, where, column) for v in value]
    else:
        refs = [as_text(value, where, column)]
    if not any(r.strip() for r in refs):  # nothing to learn or to score against
        raise DataError(f"{where} has no non-empty {column!r} (no reference output)")
    return refs


def _positive_examples(value: Any, origin: str, column: str) -> list[dict[str, str]]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{origin}: column {column!r} is a string but not JSON ({e.msg})") from e
    return parse_examples(value, column, Path(origin))


def _categories(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value if v is not None]


# --------------------------------------------------------------------------------------------
# Rows -> task


@dataclass
class RowBlock:
    """Some rows of one task from one table: the needed columns as lists, and each row's number
    in its table (0-based), for messages."""

    origin: str
    schema: Schema
    columns: Mapping[str, list[Any]]
    rows: Sequence[int]


def _shared_instruction(blocks: Sequence[RowBlock]) -> str | None:
    """The instruction when every row of the task has the same one (then it is the definition)."""
    if not all(b.schema.instruction for b in blocks):
        return None
    values = [v for b in blocks for v in b.columns[b.schema.instruction]]
    first = values[0]
    return first if isinstance(first, str) and all(v == first for v in values) else None


def _row_input(block: RowBlock, j: int, where: str, shared: str | None) -> str:
    s = block.schema
    if s.instruction is None:
        return as_text(block.columns[s.input][j], where, s.input)
    instr = block.columns[s.instruction][j]
    raw = block.columns[s.input][j] if s.input else None
    if instr is None and raw is None:
        raise DataError(f"{where} has a null {s.instruction!r} and no {s.input or 'input'!r}")
    text = "" if raw is None else as_text(raw, where, s.input)
    if shared is not None or instr is None:
        return text
    instr = as_text(instr, where, s.instruction)
    return f"{instr.strip()}\n\n{text}" if text.strip() else instr


def task_from_rows(name: str, blocks: Sequence[RowBlock], source_path: Path | None = None) -> SuperNITask:
    """Build one :class:`SuperNITask` from its rows (see the module docstring for the rules)."""
    shared = _shared_instruction(blocks)
    instances: dict[str, dict[str, Any]] = {}
    first_seen: dict[str, str] = {}
    n_rows = 0
    for block in blocks:
        s = block.schema
        for j, row in enumerate(block.rows):
            where = f"{block.origin}: row {row + 1} (task {name!r})"
            text = _row_input(block, j, where, shared)
            refs = _references(block.columns[s.output][j], where, s.output)
            if s.id is not None:
                iid = as_text(block.columns[s.id][j], where, s.id)
            else:
                iid = f"{name}-{n_rows}"
            n_rows += 1
            inst = instances.get(iid)
            if inst is None:
                instances[iid] = {"id": iid, "input": text, "output": refs}
                first_seen[iid] = f"{block.origin}: row {row + 1}"
            elif inst["input"] != text:
                raise DataError(
                    f"{where}: instance id {iid!r} is also at {first_seen[iid]} with another input; "
                    "ids must be unique within a task (rows with one id are one instance's references)"
                )
            else:
                inst["output"] += [r for r in refs if r not in inst["output"]]
    head, s = blocks[0], blocks[0].schema
    definition: Any = shared or ""
    if s.definition is not None:
        definition = next((d for d in head.columns[s.definition] if d is not None), "") or definition
    if isinstance(definition, (list, tuple)):  # the official files store a list of sentences
        definition = " ".join(str(d).strip() for d in definition)
    positive = _positive_examples(head.columns[s.positive][0], head.origin, s.positive) if s.positive else []
    categories = _categories(head.columns[s.category][0]) if s.category else []
    return SuperNITask(
        name=name,
        definition=as_text(definition, head.origin, "definition").strip(),
        positive_examples=positive,
        categories=categories,
        instances=list(instances.values()),
        source_path=source_path,
    )


def needed_columns(schema: Schema) -> list[str]:
    """The columns :func:`task_from_rows` reads."""
    names = [
        schema.input,
        schema.output,
        schema.instruction,
        schema.id,
        schema.definition,
        schema.positive,
        schema.category,
    ]
    return list(dict.fromkeys(n for n in names if n is not None))
