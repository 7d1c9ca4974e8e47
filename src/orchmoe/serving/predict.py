"""``orchmoe predict``: answers for every row of a jsonl or parquet file, through the server's engine.

Rows hold a ``prompt``, or the training format (``definition``, ``input``, optional ``examples`` /
``positive_examples``), and optionally ``id`` and ``task`` (Poly/MHR route by it: a seen task's name or
id; -1 or any other task name routes as an unseen task; the other methods route by the prompt). Decoding
is greedy, as the evaluation's. Answers are appended, each as one whole line, to a journal beside the
output (``.NAME.partial``) as they finish; a killed run started again with the same command keeps the
journal's answers (a torn last line is dropped) and does the rest. At the end the output is written in
input order, atomically, and the journal removed. An existing output is never replaced without ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import queue
from pathlib import Path
from typing import Any

from orchmoe.serving.engine import Engine, GenerationRequest
from orchmoe.serving.errors import RequestError
from orchmoe.serving.sampling import SamplingParams
from orchmoe.utils.fileio import append_lines, atomic_write, atomic_write_text, check_regular_file, read_json_lines

__all__ = ["predict", "read_rows", "journal_path"]

_FORMAT = "orchmoe-predict-1"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` / ``.json`` (lines) or ``.parquet`` file, each checked as a request body is
    (`orchmoe.serving.protocol`: ``prompt``, or ``definition`` and ``input``, ``examples``, ``task``), so a
    malformed row is named before any model is loaded."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(check_regular_file(path, "parquet file")).to_pylist()
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path} cannot be read as parquet ({e})") from None
    else:
        rows = [row for _, row in read_json_lines(path, "JSON lines file of rows")]
    for i, row in enumerate(rows):
        _check_row(row, f"{path} row {i}")
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def _check_row(row: dict, where: str) -> None:
    """A row holds what a completion request would, with the same types (a list where a string belongs is not
    stringified into the prompt) and a prompt to answer."""
    from pydantic import ValidationError

    from orchmoe.serving.protocol import CompletionBody, _first_error

    fields = {k: row[k] for k in ("prompt", "definition", "input", "examples", "task") if row.get(k) is not None}
    if "examples" not in fields and row.get("positive_examples") is not None:
        fields["examples"] = row["positive_examples"]
    try:
        CompletionBody.model_validate(fields)
    except ValidationError as e:
        raise ValueError(f"{where}: {_first_error(e).message}") from None
    has_prompt = isinstance(row.get("prompt"), str) and row["prompt"].strip()
    has_input = isinstance(row.get("input"), str) and row["input"].strip()
    if not (has_prompt or has_input):
        raise ValueError(f"{where}: needs a non-empty 'prompt', or 'definition' and 'input'")


def journal_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def _header(input_path: Path, settings: dict) -> dict:
    h = hashlib.sha256(input_path.read_bytes()).hexdigest()
    return {"format": _FORMAT, "input_sha256": h, "settings": settings}


def _resume(journal: Path, header: dict) -> dict[int, dict]:
    """The finished records of a journal (its torn last line cut off); an incompatible journal is an error."""
    raw = check_regular_file(journal, "predict journal").read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    try:
        lines = whole.decode("utf-8").splitlines()
        same = bool(lines) and json.loads(lines[0]) == header
        records = {rec["index"]: rec for rec in map(json.loads, lines[1:])} if same else {}
    except (ValueError, KeyError, TypeError):  # not JSON lines, or not records of orchmoe predict
        raise ValueError(
            f"{journal} is not the journal of an orchmoe predict (its lines are not its records): run with "
            "--overwrite to start over"
        ) from None
    if not same:
        raise ValueError(
            f"{journal} holds the answers of another input or other settings: run with --overwrite to start over"
        )
    if len(whole) != len(raw):
        with open(journal, "r+b") as fh:  # a line torn by a kill: drop it
            fh.truncate(len(whole))
    return records


def _request(served: Any, row: dict, max_tokens: int) -> GenerationRequest:
    fmt, tok = served.prompt_format, served.tokenizer
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        ids = fmt.encode_text(tok, row["prompt"])
    else:
        examples = row.get("examples") or row.get("positive_examples") or []
        ids = fmt.encode(tok, str(row.get("definition") or ""), row["input"], examples)
    if served.max_positions and len(ids) + max_tokens > served.max_positions:
        raise RequestError(f"the prompt ({len(ids)} tokens) + {max_tokens} new tokens is over the model's context")
    task = row.get("task")
    if served.routes_by_task and isinstance(task, str) and task not in served.tasks and not task.lstrip("-").isdigit():
        task = -1  # a task the adapter was not trained on: routed as unseen, as the evaluation routes it
    route = served.route(served.name, task if served.routes_by_task else None)
    return GenerationRequest(ids, route, SamplingParams(max_tokens=max_tokens))


def _record(index: int, row: dict, **fields) -> dict:
    rec = {"index": index}
    for key in ("id", "task"):
        if key in row:
            rec[key] = row[key]
    return {**rec, **fields}


def _run(engine: Engine, served: Any, todo: list[tuple[int, dict]], max_tokens: int, journal: Path, bar) -> int:
    """Feed the engine (at most its queue bound in flight), append each answer as it finishes; returns errors."""
    done: queue.Queue = queue.Queue()
    errors, in_flight, pending = 0, 0, list(reversed(todo))
    while pending or in_flight:
        while pending and in_flight < engine.max_queue:
            index, row = pending.pop()
            try:
                request = _request(served, row, max_tokens)
            except RequestError as e:
                done.put((index, row, None, e.message))
                in_flight += 1
                continue
            engine.submit(request, lambda ev, i=index, r=row: ev.kind != "delta" and done.put((i, r, ev, None)))
            in_flight += 1
        batch = [done.get()]
        while not done.empty():
            batch.append(done.get())
        lines = []
        for index, row, event, problem in batch:
            in_flight -= 1
            if event is not None and event.kind == "done":
                lines.append(_record(index, row, prediction=event.text.strip(), finish_reason=event.finish_reason))
            else:
                errors += 1
                lines.append(_record(index, row, error=problem or event.message))
        append_lines(journal, [json.dumps(rec, ensure_ascii=False) for rec in lines])
        bar.update(len(lines))
    return errors


def predict(
    path: str,
    input_file: str,
    output_file: str,
    *,
    overwrite: bool = False,
    model: str | None = None,
    dtype: str | None = None,
    max_tokens: int | None = None,
    max_batch: int = 16,
    progress: bool = True,
) -> dict[str, int]:
    """Answer every row of ``input_file`` with the adapter of ``path``; write ``output_file`` (jsonl or parquet).

    Returns:
        ``{"rows", "resumed", "errors"}``: rows in all, answers kept from a previous run, rows that failed.
    """
    from tqdm.auto import tqdm

    from orchmoe.serving.loader import load_served

    inp, out = Path(input_file).expanduser(), Path(output_file).expanduser()
    if inp.resolve() == out.resolve():
        raise ValueError("the output would overwrite the input: choose another --output")
    journal = journal_path(out)
    if overwrite:
        journal.unlink(missing_ok=True)
    elif out.exists() and not journal.exists():
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    rows = read_rows(inp)
    served = load_served(path, model=model, dtype=dtype)
    tokens = max_tokens or served.prompt_format.generation_tokens
    header = _header(inp, {"adapter": str(Path(path).expanduser().resolve()), "max_tokens": tokens, "greedy": True})
    finished = _resume(journal, header) if journal.exists() else {}
    if not journal.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(journal, json.dumps(header) + "\n")
    todo = [(i, row) for i, row in enumerate(rows) if i not in finished]
    engine = Engine(served.runner, max_batch=max_batch, max_queue=4 * max_batch).start()
    bar = tqdm(total=len(rows), initial=len(finished), desc="predict", unit="row", disable=not progress)
    try:
        if todo:
            _run(engine, served, todo, tokens, journal, bar)
    finally:
        bar.close()
        engine.stop()
    records = sorted(_resume(journal, header).values(), key=lambda r: r["index"])
    _write_output(out, records)
    journal.unlink()
    errors = sum("error" in r for r in records)
    return {"rows": len(rows), "resumed": len(finished), "errors": errors}


def _write_output(out: Path, records: list[dict]) -> None:
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(_one_type_per_column(records))
        atomic_write(out, lambda p: pq.write_table(table, p))
    else:
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _one_type_per_column(records: list[dict]) -> list[dict]:
    """Records whose columns mix types (ids 1 and "two" copied from the input) with those values as JSON text: a
    parquet column has one type, and the answers are written only after all of them were computed."""

    def kind(v: Any) -> str:
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__

    keys = {k for r in records for k in r}
    mixed = {k for k in keys if len({kind(r[k]) for r in records if r.get(k) is not None}) > 1}
    if not mixed:
        return records
    text = lambda v: v if isinstance(v, str) or v is None else json.dumps(v)  # noqa: E731
    return [{k: (text(v) if k in mixed else v) for k, v in r.items()} for r in records]
