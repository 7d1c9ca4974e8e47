"""`orchmoe predict`: answers in input order equal to lone generates, jsonl and parquet, Poly's task column,
never overwriting without --overwrite, and a killed run resumed without a torn line or a lost row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from orchmoe.cli import main
from orchmoe.serving.predict import journal_path
from serving_helpers import lone_greedy


def rows_of(task_requests, n_raw: int = 3) -> list[dict]:
    rows = [{"id": f"s{i}", **r} for i, r in enumerate(task_requests)]
    rows += [{"id": f"r{i}", "prompt": f"Definition: {r['definition']}\n\nInput: {r['input']}\nOutput:"}
             for i, r in enumerate(task_requests[:n_raw])]  # fmt: skip
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lone(served, row: dict, max_tokens: int) -> str:
    fmt, tok = served.prompt_format, served.tokenizer
    if "prompt" in row:
        ids = fmt.encode_text(tok, row["prompt"])
    else:
        ids = fmt.encode(tok, row["definition"], row["input"], row.get("examples", []))
    task = served.tasks.get(row.get("task"), -1) if served.routes_by_task else None
    return tok.decode(
        lone_greedy(served.model, ids, max_tokens, tok.eos_token_id, task), skip_special_tokens=True
    ).strip()


@pytest.mark.parametrize("method", ["orchmoe", "poly"])
def test_answers_in_input_order_equal_lone_generates(runs, references, task_requests, tmp_path, capsys, method):
    rows = rows_of(task_requests) if method == "orchmoe" else [{"id": i, **r} for i, r in enumerate(task_requests)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    args = ["predict", str(runs[method]), "--input", str(inp), "--output", str(out), "--max-tokens", "6"]
    assert main([*args, "--max-batch", "3", "--no-progress"]) == 0
    assert f"{len(rows)} rows answered" in capsys.readouterr().out
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["index"] for g in got] == list(range(len(rows))) and [g["id"] for g in got] == [r["id"] for r in rows]
    for g, row in zip(got, rows):
        assert g["prediction"] == lone(references[method], row, 6), g
    assert not journal_path(out).exists()


def test_parquet_in_and_out(runs, references, task_requests, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"definition": r["definition"], "input": r["input"]} for r in task_requests[:4]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert main(["predict", str(runs["orchmoe"]), "--input", str(tmp_path / "in.parquet"), "--output", str(out),
                 "--max-tokens", "5", "--no-progress"]) == 0  # fmt: skip
    got = pq.read_table(out).to_pylist()
    assert [g["prediction"] for g in got] == [lone(references["orchmoe"], r, 5) for r in rows]


def test_never_overwrites_and_refuses_bad_input_before_loading(runs, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, [{"prompt": "abc"}])
    out.write_text("precious\n")
    base = ["predict", str(runs["orchmoe"]), "--input", str(inp), "--no-progress"]
    assert main([*base, "--output", str(out)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err and out.read_text() == "precious\n"
    assert main([*base, "--output", str(out), "--overwrite", "--max-tokens", "2"]) == 0
    assert json.loads(out.read_text())["index"] == 0
    assert main([*base, "--output", str(inp)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    write_jsonl(inp, [{"prompt": "abc"}, {"definition": "no input here"}])
    assert main([*base, "--output", str(tmp_path / "o2.jsonl")]) == 2
    assert "row 1: needs a non-empty 'prompt'" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    assert main(["predict", str(runs["orchmoe"]), "--input", str(tmp_path / "broken.jsonl"), "--output",
                 str(tmp_path / "o3.jsonl")]) == 2  # fmt: skip
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_a_killed_run_resumes_where_it_stopped(runs, references, task_requests, tmp_path, capsys):
    rows = [{"id": i, **task_requests[i % len(task_requests)]} for i in range(240)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, rows)
    args = ["predict", str(runs["orchmoe"]), "--input", str(inp), "--output", str(out), "--max-tokens", "24",
            "--max-batch", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "orchmoe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = journal_path(out)
    deadline = time.time() + 120
    while not (journal.exists() and len(journal.read_bytes().splitlines()) > 20):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists()
    kept = len(journal.read_bytes().splitlines()) - 1
    assert 0 < kept < len(rows)
    with open(journal, "ab") as fh:
        fh.write(b'{"index": 239, "predic')  # a line torn by the kill
    assert main(args) == 0
    assert f"{kept} kept from the interrupted run" in capsys.readouterr().out
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["index"] for g in got] == list(range(len(rows))) and not journal.exists()
    for g in got[kept - 3 : kept + 3] + got[-2:]:  # around the kill and the torn line's row
        assert g["prediction"] == lone(references["orchmoe"], rows[g["index"]], 24), g


_ROW = {"definition": "Say the year.", "input": "France"}
BAD_INPUTS = [  # (file name, content, what the one error line names)
    ("in.jsonl", b'{"prompt": "caf\xe9"}\n', "in.jsonl line 1: not UTF-8 text"),
    ("in.parquet", b"PAR1 not a parquet file PAR1", "in.parquet cannot be read as parquet"),
    ("in.jsonl", [_ROW, {**_ROW, "definition": ["Say", "the year."]}], "in.jsonl row 1: definition: Input should be"),
    ("in.jsonl", [_ROW, {**_ROW, "examples": "France -> 1789"}], "in.jsonl row 1: examples: Input should be a valid"),
    ("in.jsonl", [_ROW, {**_ROW, "examples": [{"input": 1, "output": "x"}]}], "row 1: examples.0.input: Input"),
    ("in.jsonl", [_ROW, {**_ROW, "task": ["a"]}], "in.jsonl row 1: task: Input should be"),
    ("in.jsonl", [_ROW, "just text"], "in.jsonl line 2: a row must be a JSON object"),
]


@pytest.mark.parametrize("name, content, message", BAD_INPUTS, ids=[m.split(": ", 1)[-1][:30] for *_, m in BAD_INPUTS])
def test_a_malformed_input_file_or_row_is_one_line_naming_it(name, content, message, runs, tmp_path, capsys):
    """A row holds what a completion request holds, with its types: a list is never stringified into a prompt,
    a string never iterated as demonstrations; the file and the row are named, before any model is loaded."""
    inp = tmp_path / name
    if isinstance(content, bytes):
        inp.write_bytes(content)
    else:
        write_jsonl(inp, content)
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(runs["orchmoe"]), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("orchmoe predict: error: ") and message in err and "Error:" not in err, err
    assert not out.exists() and not journal_path(out).exists()


def test_an_input_fifo_and_a_foreign_journal_are_named(runs, tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "in.jsonl")
    base = ["predict", str(runs["orchmoe"]), "--no-progress", "--output", str(tmp_path / "out.jsonl")]
    assert main([*base, "--input", str(tmp_path / "in.jsonl")]) == 2  # not a hang on the FIFO
    assert "in.jsonl is a FIFO (named pipe)" in capsys.readouterr().err
    write_jsonl(tmp_path / "rows.jsonl", [_ROW])
    journal_path(tmp_path / "out.jsonl").write_text("garbage\n")
    assert main([*base, "--input", str(tmp_path / "rows.jsonl")]) == 2
    assert "is not the journal of an orchmoe predict" in capsys.readouterr().err
    assert journal_path(tmp_path / "out.jsonl").read_text() == "garbage\n"  # kept for the user to look at


def test_parquet_answers_keep_ids_of_mixed_types(runs, tmp_path):
    """Ids of two types (1 and "two") are written as text in the parquet column, not lost after all the work."""
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "in.jsonl", [{**_ROW, "id": 1}, {**_ROW, "id": "two"}])
    out = tmp_path / "out.parquet"
    assert main(["predict", str(runs["orchmoe"]), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--max-tokens", "2", "--no-progress"]) == 0  # fmt: skip
    assert pq.read_table(out).column("id").to_pylist() == ["1", "two"]
